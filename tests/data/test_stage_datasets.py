"""build_stage_datasets: disjoint stages, λ token shares, sample shapes, seeds, blends, errors.

Corpus: the 102 tiny documents (about 1.1 M tokens with the 512-piece tokenizer), split
"90,8,2" -> training documents [0, 92), validation [92, 100), test [100, 102).
"""

import numpy
import pytest
import torch

from megatron_patch.data.datasets import StageDataConfig, build_stage_datasets
from megatron_patch.errors import DataError
from tests.data.conftest import write_jsonl

K, T, LAMBDA = 4, 64, 2 / 3
SAMPLES = {"patch_train": 300, "token_train": 500, "valid": 20}


def config(data_path, tmp_path, seq_length=T, patch_size=K, **overrides) -> StageDataConfig:
    """The test's data config: samples of K*T tokens for the patch stage, T otherwise (as the run
    plan gives them)."""
    values = dict(
        data_path=data_path,
        split="90,8,2",
        patch_data_fraction=LAMBDA,
        seed=1234,
        cache_dir=str(tmp_path / "cache"),
        sample_tokens={"patch_train": patch_size * seq_length, "token_train": seq_length, "valid": seq_length},
    )
    values.update(overrides)
    return StageDataConfig(**values)


def lengths_of(prefix: str) -> numpy.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive: its __del__ closes the mmap under the view
    return numpy.array(dataset.sequence_lengths, dtype=numpy.int64)


def used_documents(dataset) -> set[int]:
    """Documents megatron's sample index actually draws from (GPTDataset.document_index)."""
    return set(int(d) for d in numpy.unique(dataset.document_index))


def expected_cut(lengths, begin: int, end: int, fraction: float) -> int:
    """Oracle for the λ rule: first boundary where the running token count reaches λ·W."""
    target = fraction * int(lengths[begin:end].sum())
    running = 0
    for doc in range(begin, end):
        running += int(lengths[doc])
        if running >= target:
            return doc + 1
    raise AssertionError("unreachable for fraction < 1")


@pytest.fixture(scope="module")
def second_prefix(tmp_path_factory, tiny_records, tokenizer_model, tools) -> str:
    """A second corpus (the tiny documents in reverse order) for blends."""
    folder = tmp_path_factory.mktemp("second")
    write_jsonl(folder / "rev.jsonl", tiny_records[::-1])
    assert (
        tools.preprocess_data.main(
            [
                "--input",
                str(folder / "rev.jsonl"),
                "--tokenizer-model",
                str(tokenizer_model),
                "--output-prefix",
                str(folder / "rev"),
                "--append-eod",
            ]
        )
        == 0
    )
    return str(folder / "rev_text_document")


def test_stages_are_disjoint_and_follow_the_lambda_rule(corpus_prefix, tokenizer, tmp_path):
    data = build_stage_datasets(config([corpus_prefix], tmp_path), tokenizer, SAMPLES)
    lengths = lengths_of(corpus_prefix)
    cut = expected_cut(lengths, 0, 92, LAMBDA)
    (split,) = data.splits
    assert (split.patch.begin, split.patch.end, split.token.begin, split.token.end) == (0, cut, cut, 92)
    assert (split.valid.begin, split.valid.end) == (92, 100)
    assert data.patch_documents == cut and data.token_documents == 92 - cut
    assert data.patch_tokens == lengths[:cut].sum() and data.token_tokens == lengths[cut:92].sum()
    # token share: λ <= patch share < λ + (longest training document) / (training tokens)
    share = data.patch_tokens / (data.patch_tokens + data.token_tokens)
    tolerance = lengths[:92].max() / lengths[:92].sum()
    assert LAMBDA <= share < LAMBDA + tolerance
    patch, token, valid = (used_documents(d) for d in (data.patch_train, data.token_train, data.valid))
    assert patch == set(range(cut)) and token == set(range(cut, 92))
    assert valid == set(range(92, 100))
    assert not (patch & token) and not (valid & (patch | token))


def test_sample_shapes_and_labels(corpus_prefix, tokenizer, tmp_path):
    data = build_stage_datasets(config([corpus_prefix], tmp_path), tokenizer, SAMPLES)
    assert len(data.patch_train) >= SAMPLES["patch_train"]
    assert len(data.token_train) >= SAMPLES["token_train"] and len(data.valid) >= 20
    for dataset, length in [(data.patch_train, K * T), (data.token_train, T), (data.valid, T)]:
        for index in (0, 7, len(dataset) - 1):
            sample = dataset[index]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(v.shape == (length,) for v in sample.values())
            assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
            assert torch.equal(sample["position_ids"], torch.arange(length))
            assert torch.all(sample["loss_mask"] == 1)  # no EOD masking (paper fidelity)
            assert int(sample["tokens"].max()) < tokenizer.vocab_size


def samples(dataset, count=8) -> list[torch.Tensor]:
    return [dataset[i]["tokens"] for i in range(count)]


def test_same_seed_same_samples(corpus_prefix, tokenizer, tmp_path):
    first = build_stage_datasets(config([corpus_prefix], tmp_path / "a"), tokenizer, SAMPLES)
    again = build_stage_datasets(config([corpus_prefix], tmp_path / "b"), tokenizer, SAMPLES)
    other = build_stage_datasets(config([corpus_prefix], tmp_path / "c", seed=99), tokenizer, SAMPLES)
    for stage in ("patch_train", "token_train", "valid"):
        a, b, c = (samples(getattr(d, stage)) for d in (first, again, other))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_token_only_puts_all_training_documents_in_the_token_stage(corpus_prefix, tokenizer, tmp_path):
    cfg = config([corpus_prefix], tmp_path, patch_size=1, patch_data_fraction=0.0)
    data = build_stage_datasets(cfg, tokenizer, {"token_train": 100, "valid": 5})
    assert data.patch_train is None and data.patch_documents == data.patch_tokens == 0
    assert data.token_documents == 92 and used_documents(data.token_train) == set(range(92))
    assert data.token_tokens == lengths_of(corpus_prefix)[:92].sum()


def test_new_lambda_is_not_served_from_a_stale_cache(corpus_prefix, tokenizer, tmp_path):
    build_stage_datasets(config([corpus_prefix], tmp_path), tokenizer, SAMPLES)
    data = build_stage_datasets(config([corpus_prefix], tmp_path, patch_data_fraction=0.25), tokenizer, SAMPLES)
    cut = expected_cut(lengths_of(corpus_prefix), 0, 92, 0.25)
    assert used_documents(data.patch_train) == set(range(cut))
    assert used_documents(data.token_train) == set(range(cut, 92))


def test_a_rewritten_prefix_is_not_served_from_a_stale_cache(tiny_records, tokenizer_model, tokenizer, tools, tmp_path):
    """Re-preprocessing a prefix with --append-eod keeps its document count, hence the stage
    ranges, but lengthens every document: the indices cached for the old files must not be reused
    (they would point into the wrong tokens, or past the end of the file)."""
    write_jsonl(tmp_path / "c.jsonl", tiny_records[:30])
    prefix = str(tmp_path / "c_text_document")

    def preprocess(*flags) -> None:
        argv = ["--input", str(tmp_path / "c.jsonl"), "--tokenizer-model", str(tokenizer_model)]
        assert tools.preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "c"), *flags]) == 0

    counts = {"token_train": 500, "valid": 20}
    token_only = dict(patch_size=1, patch_data_fraction=0.0)
    preprocess()
    old = build_stage_datasets(config([prefix], tmp_path, **token_only), tokenizer, counts)
    preprocess("--append-eod")
    new = build_stage_datasets(config([prefix], tmp_path, **token_only), tokenizer, counts)
    fresh = build_stage_datasets(config([prefix], tmp_path / "fresh", **token_only), tokenizer, counts)
    assert [(s.token.begin, s.token.end, s.valid.begin, s.valid.end) for s in old.splits] == [
        (s.token.begin, s.token.end, s.valid.begin, s.valid.end) for s in new.splits
    ]
    for stage in ("token_train", "valid"):
        got, want = getattr(new, stage), getattr(fresh, stage)
        assert len(got) == len(want)
        assert all(torch.equal(got[i]["tokens"], want[i]["tokens"]) for i in range(len(want)))


def test_a_zero_count_skips_a_dataset(corpus_prefix, tokenizer, tmp_path):
    """A token-stage-only job asks for no patch samples, and the reverse."""
    full = build_stage_datasets(config([corpus_prefix], tmp_path), tokenizer, SAMPLES)
    token_only = build_stage_datasets(
        config([corpus_prefix], tmp_path), tokenizer, {"patch_train": 0, "token_train": 500, "valid": 20}
    )
    patch_only = build_stage_datasets(config([corpus_prefix], tmp_path), tokenizer, {"patch_train": 300})
    assert token_only.patch_train is None and token_only.token_train is not None
    assert patch_only.token_train is None and patch_only.valid is None
    assert token_only.splits == patch_only.splits == full.splits
    assert all(torch.equal(a, b) for a, b in zip(samples(full.token_train), samples(token_only.token_train)))
    assert all(torch.equal(a, b) for a, b in zip(samples(full.patch_train), samples(patch_only.patch_train)))


def test_no_validation_split(corpus_prefix, tokenizer, tmp_path):
    data = build_stage_datasets(config([corpus_prefix], tmp_path, split="100,0,0"), tokenizer, SAMPLES)
    assert data.valid is None and data.token_documents + data.patch_documents == 102


@pytest.mark.parametrize("weights", [(0.7, 0.3), None])
def test_blends(corpus_prefix, second_prefix, tokenizer, tmp_path, weights):
    prefixes = [corpus_prefix, second_prefix]
    path = prefixes if weights is None else [str(weights[0]), prefixes[0], str(weights[1]), prefixes[1]]
    data = build_stage_datasets(config(path, tmp_path), tokenizer, SAMPLES)
    assert len(data.splits) == 2
    assert data.patch_tokens == sum(s.patch.tokens for s in data.splits)
    assert data.token_documents == sum(s.token.documents for s in data.splits)
    for stage, length in [("patch_train", K * T), ("token_train", T), ("valid", T)]:
        blend = getattr(data, stage)
        assert SAMPLES[stage] <= len(blend) <= SAMPLES[stage] + 2
        ids = numpy.array([blend[i]["dataset_id"] for i in range(len(blend))])
        expected = (
            weights[0]
            if weights
            else getattr(data.splits[0], stage.split("_")[0]).tokens
            / sum(getattr(s, stage.split("_")[0]).tokens for s in data.splits)
        )
        assert abs((ids == 0).mean() - expected) <= 2 / len(blend)
        assert blend[3]["tokens"].shape == (length,)
    for i, split in enumerate(data.splits):
        patch = used_documents(data.patch_train.datasets[i])
        token = used_documents(data.token_train.datasets[i])
        assert patch == set(range(split.patch.begin, split.patch.end))
        assert token == set(range(split.token.begin, split.token.end)) and not patch & token


def test_world_of_one(corpus_prefix, second_prefix, tokenizer, tmp_path):
    """With torch.distributed initialised, rank 0 builds and caches first (barrier pattern)."""
    import torch.distributed as dist

    path = ["0.5", corpus_prefix, "0.5", second_prefix]
    reference = build_stage_datasets(config(path, tmp_path / "ref"), tokenizer, SAMPLES)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        data = build_stage_datasets(config(path, tmp_path / "dist"), tokenizer, SAMPLES)
        cached = build_stage_datasets(config(path, tmp_path / "dist"), tokenizer, SAMPLES)
    finally:
        if created:
            dist.destroy_process_group()
    assert list((tmp_path / "dist" / "cache").glob("*BlendedDataset*dataset_index.npy"))
    for stage in ("patch_train", "token_train", "valid"):
        for other in (data, cached):
            a, b = samples(getattr(reference, stage)), samples(getattr(other, stage))
            assert all(torch.equal(x, y) for x, y in zip(a, b))


class SmallVocab:
    """A tokenizer whose vocabulary is smaller than the data's token ids."""

    def __new__(cls, inner, vocab_size):
        from megatron.core.tokenizers import MegatronTokenizerBase

        class _Small(MegatronTokenizerBase):
            def __init__(self):
                super().__init__(path="", config={})
                self.unique_identifiers = {"class": "SmallVocab", "vocab_size": vocab_size}

            tokenize, detokenize = inner.tokenize, inner.detokenize
            vocab = property(lambda self: {})
            vocab_size = property(lambda self: vocab_size)
            eod = property(lambda self: inner.eod)
            pad = property(lambda self: -1)

            def apply_chat_template(self):
                raise NotImplementedError

        return _Small()


def test_errors(corpus_prefix, tokenizer, tmp_path):
    def error(cfg, tok=tokenizer, counts=SAMPLES) -> str:
        with pytest.raises(DataError) as info:
            build_stage_datasets(cfg, tok, counts)
        assert "\n" not in str(info.value)
        return str(info.value)

    message = error(config([str(tmp_path / "absent_text_document")], tmp_path))
    assert "absent_text_document" in message and "tools/preprocess_data.py" in message
    assert "no training documents" in error(config([corpus_prefix], tmp_path, split="0,1,0"))
    message = error(config([corpus_prefix], tmp_path, seq_length=200_000))
    assert "patch_train stage" in message and "needs 800001" in message
    assert "--seq-length" in message and "patch_data_fraction" in message
    message = error(config([corpus_prefix], tmp_path, patch_data_fraction=0.999))
    assert "token_train stage" in message
    message = error(
        config([corpus_prefix], tmp_path, patch_size=1, seq_length=150_000), counts={"token_train": 1, "valid": 1}
    )
    assert "valid stage" in message and "needs 150001" in message
    assert "patch_data_fraction" not in message
    message = error(config([corpus_prefix], tmp_path), tok=SmallVocab(tokenizer, 100))
    assert "token id 511" in message and "only 100 ids" in message
    assert "num_samples['train']" in error(config([corpus_prefix], tmp_path), counts={"train": 5})
    assert "-1" in error(config([corpus_prefix], tmp_path), counts={"token_train": -1})
    assert "no training sample" in error(config([corpus_prefix], tmp_path), counts={"patch_train": 0, "valid": 5})
    (tmp_path / "file").write_text("")
    message = error(config([corpus_prefix], tmp_path, cache_dir=str(tmp_path / "file" / "c")))
    assert "file/c" in message and "cache_dir" in message


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"patch_data_fraction": 1.5}, "patch_data_fraction 1.5 must be in (0, 1)"),
        ({"split": "a,b"}, "split 'a,b'"),
        ({"seq_length": 0}, "sample_tokens['patch_train'] = 0"),
        ({"data_path": ["0.5", "p1", "x", "p2"]}, "alternate weight and prefix"),
        ({"data_path": []}, "non-empty list"),
    ],
)
def test_config_validation(tmp_path, overrides, needle):
    overrides = {"data_path": ["p"], **overrides}
    with pytest.raises(DataError) as info:
        config(overrides.pop("data_path"), tmp_path, **overrides)
    assert needle in str(info.value)
