"""The epochs split (``stage_split="epochs"``): both stages draw from all training documents, for
the passes their share of the budget gives them, counted token by token from megatron's indices.

Corpus: 13 synthetic documents (ids < 512, the test tokenizer's vocabulary) of W = 1281 tokens,
all of them training documents. Plan: K=4, T=16, G=8 (the patch stage: 2 samples of 64 tokens per
step; the token stage: 8 samples of 16), 40 steps, λ=1/2: each stage trains on 20 x 128 = 2560
tokens. A sample of L tokens reads L+1 (its last token's label), so S samples need S*L+1 tokens;
with W = 2560/2 + 1 both stages fit in exactly two passes and read every sample megatron built
(the budget is 3.998 epochs: 2 tokens short of 4, which would make megatron start a third pass
for one label token).
"""

import numpy
import pytest
import torch

from megatron_patch.data.datasets import StageDataConfig, build_stage_datasets, stage_seed
from megatron_patch.errors import DataError
from megatron_patch.training.plan import make_plan

K, T, G, ITERS = 4, 16, 8, 40
LENGTHS = [130, 61, 97, 200, 45, 88, 150, 73, 120, 66, 95, 84, 72]  # W = 1281 tokens
W = sum(LENGTHS)


def write_prefix(folder, lengths, seed=0) -> str:
    """A ``.bin/.idx`` pair of documents of ``lengths`` random ids (megatron's own builder)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(folder / "synthetic")
    generator = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for length in lengths:
        builder.add_item(torch.from_numpy(generator.integers(0, 500, size=length).astype(numpy.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def plan_for(iters, stage_split="epochs"):
    return make_plan(
        patch_size=K,
        patch_data_fraction=0.5,
        stages="both",
        seq_length=T,
        micro_batch_size=1,
        global_batch_size=G,
        data_parallel_size=1,
        eval_iters=0,
        train_iters=iters,
        stage_split=stage_split,
    )


def build(prefixes, tmp_path, plan, stage_split="epochs", tokenizer=None, **overrides):
    values = dict(
        data_path=prefixes,
        split="100,0,0",
        patch_data_fraction=0.5,
        seed=1234,
        cache_dir=str(tmp_path / "cache"),
        stage_split=stage_split,
        sample_tokens=plan.dataset_sample_tokens(),
    )
    values.update(overrides)
    return build_stage_datasets(StageDataConfig(**values), tokenizer, plan.dataset_samples())


def input_tokens(dataset, samples: int) -> numpy.ndarray:
    """[documents] tokens of each document the first ``samples`` samples train on as inputs (the
    label-only last token of a sample is not counted), summed over every time it is read."""
    lengths = dataset.dataset.sequence_lengths
    counts = numpy.zeros(len(lengths), dtype=numpy.int64)
    for position in range(samples):
        index = dataset.shuffle_index[position]
        (begin, begin_offset), (end, end_offset) = dataset.sample_index[index], dataset.sample_index[index + 1]
        if begin == end:
            counts[dataset.document_index[begin]] += end_offset - begin_offset
            continue
        counts[dataset.document_index[begin]] += lengths[dataset.document_index[begin]] - begin_offset
        for middle in range(begin + 1, end):
            counts[dataset.document_index[middle]] += lengths[dataset.document_index[middle]]
        counts[dataset.document_index[end]] += end_offset
    return counts


def test_four_epochs_at_half_see_every_document_twice_in_each_stage(tmp_path, tokenizer):
    prefix = write_prefix(tmp_path, LENGTHS)
    plan = plan_for(ITERS)
    assert plan.stage_tokens() == {"patch": 2560, "token": 2560}
    assert plan.epochs({"patch": W, "token": W}) == {"patch": 2560 / W, "token": 2560 / W}
    data = build([prefix], tmp_path, plan, tokenizer=tokenizer)
    assert data.stage_split == "epochs" and data.train_tokens == data.patch_tokens == data.token_tokens == W
    lengths = numpy.array(LENGTHS)
    for dataset, samples in (
        (data.patch_train, plan.stage("patch").samples),
        (data.token_train, plan.stage("token").samples),
    ):
        assert len(dataset) == samples  # two whole passes hold exactly the stage's samples
        assert numpy.bincount(dataset.document_index, minlength=13).tolist() == [2] * 13
        counts = input_tokens(dataset, samples)
        assert counts.sum() == 2560
        # every token of every document is an input twice, except the last two of the second pass
        # (its last document's): one is the last sample's label, the other is never read
        last = int(dataset.document_index[-1])
        expected = 2 * lengths
        expected[last] -= 2
        assert counts.tolist() == expected.tolist()
    # the token stage does not replay the patch stage's document order
    assert not numpy.array_equal(data.patch_train.document_index, data.token_train.document_index)
    assert data.token_train.config.random_seed == stage_seed(data_config(prefix, tmp_path), "token_train") != 1234


def data_config(prefix, tmp_path):
    return StageDataConfig(
        data_path=[prefix],
        split="100,0,0",
        patch_data_fraction=0.5,
        seed=1234,
        stage_split="epochs",
        sample_tokens={"patch_train": K * T, "token_train": T, "valid": T},
    )


def test_a_fractional_epoch_reads_one_pass_then_part_of_a_reshuffled_second(tmp_path, tokenizer):
    """3 epochs at λ=1/2: 1.5 passes per stage. Megatron shuffles a final pass under 80% of one
    apart from the others, so the first pass is read whole before any of the second."""
    prefix = write_prefix(tmp_path, LENGTHS)
    plan = plan_for(30)
    data = build([prefix], tmp_path, plan, tokenizer=tokenizer)
    lengths = numpy.array(LENGTHS)
    for dataset, samples in (
        (data.patch_train, plan.stage("patch").samples),
        (data.token_train, plan.stage("token").samples),
    ):
        counts = input_tokens(dataset, samples)
        assert counts.sum() == 1920 and 1920 / W == pytest.approx(1.5, abs=2e-3)
        first_pass = input_tokens(dataset, (W - 1) // dataset.config.sequence_length)  # the first pass's samples
        assert numpy.all(first_pass >= lengths - 1) and first_pass.sum() == W - 1  # all but its last label
        assert numpy.all(counts <= 2 * lengths)


def test_modes_do_not_share_cached_indices(tmp_path, tokenizer):
    """The same cache folder for a documents run and an epochs run: each gets its own indices."""
    prefix = write_prefix(tmp_path, LENGTHS)
    documents = build([prefix], tmp_path, plan_for(ITERS, "documents"), "documents", tokenizer=tokenizer)
    epochs = build([prefix], tmp_path, plan_for(ITERS), tokenizer=tokenizer)
    assert documents.patch_tokens + documents.token_tokens == W and documents.patch_tokens < W
    assert set(numpy.unique(documents.token_train.document_index)) < set(range(13))
    assert set(numpy.unique(epochs.token_train.document_index)) == set(range(13))
    token_only = build(
        [prefix], tmp_path, plan_for(ITERS, "documents"), "documents", tokenizer=tokenizer, patch_data_fraction=0.0
    )
    token_only_epochs = build([prefix], tmp_path, plan_for(ITERS), tokenizer=tokenizer, patch_data_fraction=0.0)
    assert token_only.token_train.unique_description_hash != token_only_epochs.token_train.unique_description_hash


def test_a_blend_draws_every_prefix_whole_in_both_stages(tmp_path, tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = write_prefix(tmp_path / "a", LENGTHS), write_prefix(tmp_path / "b", LENGTHS[::-1], seed=1)
    plan = plan_for(ITERS)
    data = build(["0.5", first, "0.5", second], tmp_path, plan, tokenizer=tokenizer)
    assert data.train_tokens == 2 * W and data.patch_tokens == data.token_tokens == 2 * W
    for stage in (data.patch_train, data.token_train):
        for member in stage.datasets:
            assert set(numpy.unique(member.document_index).tolist()) == set(range(13))


def test_an_unknown_stage_split_is_one_line():
    with pytest.raises(DataError, match="stage_split 'passes' must be one of documents, epochs"):
        StageDataConfig(
            data_path=["p"],
            split="100,0,0",
            patch_data_fraction=0.5,
            stage_split="passes",
            sample_tokens={"patch_train": K * T, "token_train": T, "valid": T},
        )
