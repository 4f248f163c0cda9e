"""aggregate_patches (paper Eq. 1) and patch_targets (next-patch targets) against hand-computed
examples and the plain-loop references in ``tests/reference.py``."""

import re

import pytest
import torch

from megatron_patch.embedding import aggregate_patches
from megatron_patch.loss import patch_targets
from tests.reference import reference_aggregate_patches, reference_patch_targets, relative_error

FP32_TOL = 1e-6
# bf16 output: the mean is rounded once to bf16 (8 significant bits); half a bf16 ulp is at most
# 2**-8 of the element's magnitude, plus the fp32 bound for the arithmetic before the rounding.
BF16_TOL = 2.0**-8 + FP32_TOL

BAD_PATCH_SIZES = [0, -1, 2.0, True, "2", None]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


def _names_number(message: str, number: int) -> bool:
    return re.search(rf"(?<![\d.]){number}(?![\d.])", message) is not None


# ---------------------------------------------------------------- aggregate_patches


def test_aggregate_hand_example_k2():
    # [s*K=4, b=2, h=2], K=2
    embeddings = torch.tensor(
        [
            [[1.0, 2.0], [0.0, 8.0]],
            [[3.0, 6.0], [2.0, -8.0]],
            [[10.0, -4.0], [1.0, 1.0]],
            [[0.0, 0.0], [3.0, 5.0]],
        ]
    )
    expected = torch.tensor(
        [
            [[2.0, 4.0], [1.0, 0.0]],
            [[5.0, -2.0], [2.0, 3.0]],
        ]
    )
    out = aggregate_patches(embeddings, 2)
    assert out.shape == (2, 2, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_aggregate_hand_example_k3():
    # [s*K=6, b=2, h=1], K=3: batch 0 holds 1..6, batch 1 holds 0,0,3 | 3,3,9
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0], [4.0, 3.0], [5.0, 3.0], [6.0, 9.0]]).unsqueeze(-1)
    expected = torch.tensor([[2.0, 1.0], [5.0, 5.0]]).unsqueeze(-1)
    torch.testing.assert_close(aggregate_patches(embeddings, 3), expected, rtol=0, atol=0)


def test_aggregate_k1_is_identity():
    embeddings = torch.randn(5, 2, 3)
    assert aggregate_patches(embeddings, 1) is embeddings


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_aggregate_matches_loop_reference_fp32(patch_size):
    gen = torch.Generator().manual_seed(100 + patch_size)
    embeddings = torch.randn(3 * patch_size, 2, 5, generator=gen) * 4.0
    out = aggregate_patches(embeddings, patch_size)
    assert out.shape == (3, 2, 5) and out.dtype == torch.float32
    assert relative_error(out, reference_aggregate_patches(embeddings, patch_size)) <= FP32_TOL


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_aggregate_matches_loop_reference_bf16(patch_size):
    gen = torch.Generator().manual_seed(200 + patch_size)
    embeddings = (torch.randn(3 * patch_size, 2, 5, generator=gen) * 4.0).to(torch.bfloat16)
    out = aggregate_patches(embeddings, patch_size)
    assert out.dtype == torch.bfloat16
    # the reference sees the same bf16 values, so only the output rounding remains
    assert relative_error(out, reference_aggregate_patches(embeddings, patch_size)) <= BF16_TOL


def test_aggregate_gradient_spreads_evenly():
    # d E(p_i) / d E(x_{iK+k}) = 1/K: every token of patch i receives upstream[i] / K
    patch_size = 4
    gen = torch.Generator().manual_seed(3)
    embeddings = torch.randn(2 * patch_size, 3, 2, generator=gen, dtype=torch.float64)
    embeddings.requires_grad_(True)
    upstream = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
    aggregate_patches(embeddings, patch_size).backward(upstream)
    # [s, b, h] -> [s*K, b, h]: each patch's upstream repeated over its K tokens
    expected = upstream.repeat_interleave(patch_size, dim=0) / patch_size
    torch.testing.assert_close(embeddings.grad, expected, rtol=1e-15, atol=1e-15)


def test_aggregate_sequence_parallel_chunk_of_whole_patches():
    embeddings = torch.randn(8, 2, 3)
    torch.testing.assert_close(
        aggregate_patches(embeddings, 4, sequence_parallel=True),
        aggregate_patches(embeddings, 4),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("patch_size", BAD_PATCH_SIZES)
def test_aggregate_rejects_bad_patch_size(patch_size):
    with pytest.raises(ValueError) as excinfo:
        aggregate_patches(torch.zeros(4, 1, 2), patch_size)
    assert "patch_size" in _one_line(excinfo)


def test_aggregate_rejects_ragged_length():
    with pytest.raises(ValueError) as excinfo:
        aggregate_patches(torch.zeros(14, 2, 3), 4)
    message = _one_line(excinfo)
    assert _names_number(message, 14) and _names_number(message, 4), message


def test_aggregate_ragged_sequence_parallel_chunk_names_tensor_parallel_size():
    with pytest.raises(ValueError) as excinfo:
        aggregate_patches(torch.zeros(14, 2, 3), 4, sequence_parallel=True)
    message = _one_line(excinfo)
    assert _names_number(message, 14) and _names_number(message, 4), message
    assert re.search(r"tensor[- ]parallel", message, re.IGNORECASE), message


# ---------------------------------------------------------------- patch_targets


def _sequence_first(labels, loss_mask, patch_size):
    """patch_targets' ``[b, T, K]`` targets and mask as ``[T, b, K]``, the layout the hand examples
    below are written in (one position's patches of every sample side by side)."""
    targets, mask = patch_targets(labels, loss_mask, patch_size)
    assert targets.shape == mask.shape == (labels.shape[0], labels.shape[1] // patch_size, patch_size)
    return targets.transpose(0, 1), mask.transpose(0, 1)  # [b, T, K] -> [T, b, K]


def test_patch_targets_hand_example_k2():
    # two samples of K*T + 1 = 7 tokens, K=2, T=3: x = 10..16 and 20..26; labels = x[1:]
    labels = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]])
    targets, mask = _sequence_first(labels, None, 2)
    assert targets.shape == (3, 2, 2) and mask.shape == (3, 2, 2)
    assert targets.dtype == torch.int64 and mask.dtype == torch.float32
    # patch 0 -> tokens of patch 1 (x2, x3); patch 1 -> x4, x5; patch 2 -> (x6, x7): x7 is past the
    # end of the sample, so the last patch is not scored
    expected = torch.tensor([[[12, 13], [22, 23]], [[14, 15], [24, 25]]])
    torch.testing.assert_close(targets[:2], expected, rtol=0, atol=0)
    expected_mask = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    # masked slots still hold valid ids (here: ids of the sample) so the loss can gather them
    assert set(targets[2].flatten().tolist()) <= set(labels.flatten().tolist())


def test_patch_targets_hand_example_loss_mask_k2():
    labels = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]])
    # sample 0: label 2 (x3 = 13) is skipped -> patch 0, target k=1
    # sample 1: label 0 (x1, never a target), label 4 (x5 = 25) -> patch 1, k=1, and label 5 (x6,
    #           in the unscored last patch anyway)
    loss_mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    targets, mask = _sequence_first(labels, loss_mask, 2)
    expected_mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(mask, expected_mask, rtol=0, atol=0)
    # the loss mask changes which targets count, never the target ids themselves
    torch.testing.assert_close(targets, _sequence_first(labels, None, 2)[0], rtol=0, atol=0)


def test_patch_targets_hand_example_k4():
    # x = 100..108: 9 tokens, K=4, T=2; patch 0 -> x4..x7; patch 1 -> x8..x11 (not in the sample)
    labels = torch.arange(101, 109).unsqueeze(0)
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])  # label 5 = x6 = 106
    targets, mask = _sequence_first(labels, loss_mask, 4)
    torch.testing.assert_close(targets[0, 0], torch.tensor([104, 105, 106, 107]))
    expected_mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(mask[:, 0], expected_mask, rtol=0, atol=0)


def test_patch_targets_k1_is_next_token_prediction():
    # x = 5, 6, 7, 8: at K=1 position i is scored against x_{i+1} = labels[i], the last one too
    labels = torch.tensor([[6, 7, 8]])
    targets, mask = _sequence_first(labels, None, 1)
    torch.testing.assert_close(targets, torch.tensor([[[6]], [[7]], [[8]]]))
    torch.testing.assert_close(mask, torch.ones(3, 1, 1), rtol=0, atol=0)

    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    loss_mask = (torch.rand(3, 9, generator=gen) > 0.3).float()
    targets, mask = _sequence_first(labels, loss_mask, 1)
    # [b, s] -> [s, b, 1]
    torch.testing.assert_close(targets, labels.t().unsqueeze(-1), rtol=0, atol=0)
    torch.testing.assert_close(mask, loss_mask.t().unsqueeze(-1), rtol=0, atol=0)


@pytest.mark.parametrize("patch_size", [1, 2, 3, 4, 8])
def test_patch_targets_match_loop_reference(patch_size):
    gen = torch.Generator().manual_seed(300 + patch_size)
    batch, num_patches = 3, 5
    samples = torch.randint(0, 1000, (batch, patch_size * num_patches + 1), generator=gen)
    loss_mask = (torch.rand(batch, patch_size * num_patches, generator=gen) > 0.25).float()
    labels = samples[:, 1:]
    targets, mask = _sequence_first(labels, loss_mask, patch_size)
    assert targets.shape == (num_patches, batch, patch_size) == mask.shape
    unmasked_targets, unmasked_mask = _sequence_first(labels, None, patch_size)
    for b in range(batch):
        sample = samples[b].tolist()
        ref_targets, ref_mask = reference_patch_targets(sample, patch_size, loss_mask[b].tolist())
        _, ref_full_mask = reference_patch_targets(sample, patch_size)
        assert mask[:, b].tolist() == ref_mask
        assert unmasked_mask[:, b].tolist() == ref_full_mask
        for i in range(num_patches):
            for k in range(patch_size):
                if ref_full_mask[i][k]:
                    assert targets[i, b, k].item() == ref_targets[i][k]
                else:
                    # placeholder: any id of the sample is a valid id of the vocabulary
                    assert targets[i, b, k].item() in sample
    torch.testing.assert_close(targets, unmasked_targets, rtol=0, atol=0)
    # only the last patch lacks targets, and only when K > 1
    scored_patches = num_patches if patch_size == 1 else num_patches - 1
    assert unmasked_mask.sum().item() == scored_patches * batch * patch_size


def test_patch_targets_are_int64_for_int32_labels():
    targets, _ = _sequence_first(torch.arange(1, 7, dtype=torch.int32).unsqueeze(0), None, 2)
    assert targets.dtype == torch.int64


@pytest.mark.parametrize("patch_size", BAD_PATCH_SIZES)
def test_patch_targets_rejects_bad_patch_size(patch_size):
    with pytest.raises(ValueError) as excinfo:
        _sequence_first(torch.zeros(1, 4, dtype=torch.long), None, patch_size)
    assert "patch_size" in _one_line(excinfo)


def test_patch_targets_rejects_ragged_length():
    with pytest.raises(ValueError) as excinfo:
        _sequence_first(torch.zeros(2, 14, dtype=torch.long), None, 4)
    message = _one_line(excinfo)
    assert _names_number(message, 14) and _names_number(message, 4), message


def test_patch_targets_rejects_loss_mask_of_another_shape():
    with pytest.raises(ValueError) as excinfo:
        _sequence_first(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 6), 4)
    message = _one_line(excinfo)
    assert "(2, 6)" in message and "(2, 8)" in message, message
