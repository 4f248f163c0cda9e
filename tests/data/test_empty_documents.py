"""Empty documents: tools/preprocess_data.py writes what Megatron-LM's tools/preprocess_data.py
writes, byte for byte, and the rest of the project reads such a pair as if they were absent.

The oracle is :func:`megatron_lm_pair`, Megatron-LM's tool (core_v0.16.1) reduced to what it does
with one JSON key and no sentence splitting: per line, the text's token ids, plus EOD only when
there is at least one id (``--append-eod``), handed to ``IndexedDatasetBuilder.add_document`` with
the sequence lengths ``[len(ids)]``, or ``[]`` for an empty text. An empty document therefore adds
an entry to the index's ``document_indices`` but none to ``sequence_lengths`` and no byte to .bin.
"""

import json

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_patch.data.datasets import build_stage_datasets
from megatron_patch.evaluation.token_stream import corpus_from_files, corpus_from_prefix
from tests.data.conftest import write_jsonl
from tests.data.test_stage_datasets import config as stage_config

EMPTY = (0, 1, 2, 9, 17, 29)  # lines 0-2 fill partition 0 of 10 (line j of 30 -> shard j*10//30)


def megatron_lm_pair(jsonl, tokenizer, append_eod: bool, prefix: str) -> None:
    """Write ``prefix.bin/.idx`` as Megatron-LM's tools/preprocess_data.py does (module doc)."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    with open(jsonl, encoding="utf-8") as stream:
        for line in stream:
            ids = tokenizer.tokenize(json.loads(line)["text"])
            if ids and append_eod:
                ids = ids + [tokenizer.eod]
            builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(prefix + ".idx")


def read(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as bin_file, open(prefix + ".idx", "rb") as idx_file:
        return bin_file.read(), idx_file.read()


def index_arrays(prefix: str) -> tuple[list[int], list[int]]:
    """(sequence_lengths, document_indices) of a pair."""
    dataset = IndexedDataset(prefix)
    return dataset.sequence_lengths.tolist(), dataset.document_indices.tolist()


@pytest.fixture(scope="module")
def with_empty(tmp_path_factory, tiny_records):
    """30 tiny documents, lines ``EMPTY`` emptied (whitespace would not do: this tokenizer keeps
    it as pieces)."""
    records = [dict(r) for r in tiny_records[30:60]]
    for line in EMPTY:
        records[line] = {"text": ""}
    return write_jsonl(tmp_path_factory.mktemp("empty") / "e.jsonl", records)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory, with_empty, tokenizer_model, tools):
    """The corpus preprocessed with --append-eod by default and with --skip-empty-documents."""
    folder = tmp_path_factory.mktemp("both")
    common = ["--input", str(with_empty), "--tokenizer-model", str(tokenizer_model), "--append-eod"]
    assert tools.preprocess_data.main(common + ["--output-prefix", str(folder / "keep")]) == 0
    assert tools.preprocess_data.main(common + ["--output-prefix", str(folder / "skip"), "--skip-empty-documents"]) == 0
    return str(folder / "keep_text_document"), str(folder / "skip_text_document")


@pytest.mark.parametrize("append_eod", [True, False])
def test_default_output_is_megatron_lm_s_byte_for_byte(
    tmp_path, with_empty, tokenizer, tokenizer_model, tools, append_eod, capsys
):
    megatron_lm_pair(with_empty, tokenizer, append_eod, str(tmp_path / "reference"))
    expected = read(str(tmp_path / "reference"))
    lengths, documents = index_arrays(str(tmp_path / "reference"))
    assert len(lengths) == 30 - len(EMPTY) and len(documents) == 31  # the oracle keeps empty entries
    eod = ["--append-eod"] if append_eod else []
    runs = {
        "one": [],
        "two workers": ["--workers", "2", "--chunk-bytes", "30000"],
        # partition 0 holds only empty documents: a shard with an empty .bin
        "ten partitions": ["--partitions", "10"],
    }
    for name, extra in runs.items():
        prefix = tmp_path / name.replace(" ", "_")
        assert (
            tools.preprocess_data.main(
                [
                    "--input",
                    str(with_empty),
                    "--tokenizer-model",
                    str(tokenizer_model),
                    "--output-prefix",
                    str(prefix),
                    *eod,
                    *extra,
                ]
            )
            == 0
        )
        assert read(f"{prefix}_text_document") == expected, name
    assert read(str(tmp_path / "ten_partitions_0_text_document"))[0] == b""
    out = capsys.readouterr().out
    assert f"{30 - len(EMPTY)} documents" in out
    assert f"{len(EMPTY)} empty kept as empty index entries" in out


def test_skip_flag_drops_only_the_empty_index_entries(both_ways, capsys, tools, with_empty, tokenizer_model, tmp_path):
    keep, skip = both_ways
    assert read(keep)[0] == read(skip)[0]  # the same tokens
    keep_lengths, keep_documents = index_arrays(keep)
    skip_lengths, skip_documents = index_arrays(skip)
    assert keep_lengths == skip_lengths
    assert skip_documents == list(range(len(skip_lengths) + 1))
    assert sorted(set(keep_documents)) == skip_documents  # each empty document repeats an entry
    repeats = [i - 1 for i in range(1, len(keep_documents)) if keep_documents[i] == keep_documents[i - 1]]
    assert repeats == list(EMPTY)
    assert (
        tools.preprocess_data.main(
            [
                "--input",
                str(with_empty),
                "--tokenizer-model",
                str(tokenizer_model),
                "--output-prefix",
                str(tmp_path / "s"),
                "--skip-empty-documents",
            ]
        )
        == 0
    )
    assert f"{len(EMPTY)} empty skipped" in capsys.readouterr().out


def test_shards_with_empty_documents_merge_to_the_unsharded_pair(
    both_ways, tmp_path, with_empty, tokenizer_model, tools
):
    keep, _ = both_ways
    assert (
        tools.preprocess_data.main(
            [
                "--input",
                str(with_empty),
                "--tokenizer-model",
                str(tokenizer_model),
                "--output-prefix",
                str(tmp_path / "p"),
                "--append-eod",
                "--partitions",
                "4",
                "--no-merge-partitions",
            ]
        )
        == 0
    )
    assert tools.merge_datasets.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert read(str(tmp_path / "merged")) == read(keep)


def test_stage_datasets_and_evaluation_ignore_empty_entries(both_ways, tokenizer, tmp_path, with_empty):
    keep, skip = both_ways
    sizes = {"patch_train": 40, "token_train": 60, "valid": 4}
    built = {}
    for name, prefix in (("keep", keep), ("skip", skip)):
        config = stage_config([prefix], tmp_path / name, seq_length=32, split="80,20,0")
        built[name] = build_stage_datasets(config, tokenizer, sizes)
    assert built["keep"].splits[0].patch == built["skip"].splits[0].patch
    assert built["keep"].splits[0].valid == built["skip"].splits[0].valid
    for stage, count in sizes.items():
        for index in range(count):
            assert torch.equal(
                getattr(built["keep"], stage)[index]["tokens"], getattr(built["skip"], stage)[index]["tokens"]
            )

    stream = corpus_from_prefix(keep, tokenizer)
    assert stream.documents == 30 - len(EMPTY)
    numpy.testing.assert_array_equal(stream.stream, corpus_from_prefix(skip, tokenizer).stream)
    numpy.testing.assert_array_equal(stream.stream, corpus_from_files([str(with_empty)], tokenizer).stream)
