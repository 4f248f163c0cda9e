"""tools/merge_datasets.py with a folder as --input: one corpus only, and what its report counts.

A folder that ``tools/preprocess_data.py --partitions`` wrote holds the shards and their merge;
merging all of its pairs would store every document twice. A folder with pairs of two JSON keys
would mix another field's texts into the documents. Both are refused with one line.
"""

import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.data.conftest import write_jsonl
from tests.data.test_bad_inputs import fails


def preprocess(tools, tokenizer_model, corpus, prefix, *extra) -> None:
    argv = ["--input", corpus, "--tokenizer-model", tokenizer_model, "--output-prefix", prefix, "--append-eod"]
    assert tools.preprocess_data.main([str(a) for a in [*argv, *extra]]) == 0


def merge(tools, *argv) -> int:
    return tools.merge_datasets.main([str(a) for a in argv])


@pytest.fixture
def corpus(tmp_path, tiny_records):
    """20 tiny documents, lines 3 and 11 emptied."""
    records = [dict(r) for r in tiny_records[:20]]
    records[3] = records[11] = {"text": ""}
    return write_jsonl(tmp_path / "c.jsonl", records)


def test_folder_with_shards_and_their_merge_is_refused(tools, tokenizer_model, corpus, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    preprocess(tools, tokenizer_model, corpus, data / "train", "--partitions", "4")
    capsys.readouterr()
    out = tmp_path / "merged_text_document"
    line = fails(
        capsys,
        merge(tools, "--input", data, "--output-prefix", out),
        f"folder '{data}'",
        "train_0_text_document .. train_3_text_document (4 pairs)",
        "their merge train_text_document",
        "merged twice",
        "--input PREFIX",
    )
    assert "Traceback" not in line
    assert not list(tmp_path.glob("merged*")) and not list(tmp_path.glob(".merge*"))
    # the merge alone, or the shards alone, is one corpus: both give the same 20 documents
    assert merge(tools, "--input", data / "train_text_document", "--output-prefix", out) == 0
    whole = capsys.readouterr().out
    assert "merged 1 datasets: 20 documents (2 of them empty), 18 sequences" in whole
    for ext in (".bin", ".idx"):
        (data / f"train_text_document{ext}").unlink()
    assert merge(tools, "--input", data, "--output-prefix", tmp_path / "shards_text_document") == 0
    assert "merged 4 datasets: 20 documents (2 of them empty), 18 sequences" in capsys.readouterr().out
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"shards_text_document{ext}").read_bytes() == (
            tmp_path / f"merged_text_document{ext}"
        ).read_bytes()


def test_folder_with_two_json_keys_is_refused(tools, tokenizer_model, tiny_records, tmp_path, capsys):
    records = [{"text": r["text"], "title": r["text"][:30]} for r in tiny_records[:12]]
    data = tmp_path / "data"
    data.mkdir()
    corpus = write_jsonl(tmp_path / "t.jsonl", records)
    preprocess(tools, tokenizer_model, corpus, data / "wiki", "--json-keys", "text", "title")
    capsys.readouterr()
    fails(
        capsys,
        merge(tools, "--input", data, "--output-prefix", tmp_path / "m"),
        f"folder '{data}'",
        "2 JSON keys",
        "wiki_text_document (key 'text')",
        "wiki_title_document (key 'title')",
        "prefixes of one key",
    )
    assert not list(tmp_path.glob("m.*"))
    # the same pairs named explicitly are merged: the caller has said what belongs together
    assert (
        merge(
            tools,
            "--input",
            data / "wiki_text_document",
            data / "wiki_title_document",
            "--output-prefix",
            tmp_path / "m",
        )
        == 0
    )
    assert "merged 2 datasets: 24 documents (0 of them empty), 24 sequences" in capsys.readouterr().out


def test_folder_of_separate_corpora_of_one_key_is_merged(tools, tokenizer_model, corpus, tmp_path, capsys):
    """Corpora preprocessed one by one, with names that only look numbered, are not shards."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("cc_2023", "cc_2024", "books"):
        preprocess(tools, tokenizer_model, corpus, data / name)
    capsys.readouterr()
    assert merge(tools, "--input", data, "--output-prefix", tmp_path / "all_text_document") == 0
    out = capsys.readouterr().out
    assert "merged 3 datasets: 60 documents (6 of them empty), 54 sequences" in out
    assert out.index("books_text_document") < out.index("cc_2023_text_document") < out.index("cc_2024_text_document")


def test_folder_holding_the_output_pair_is_refused(tools, tokenizer_model, corpus, tmp_path, capsys):
    """The pair that --output-prefix names was left out of the merge and then overwritten."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        preprocess(tools, tokenizer_model, corpus, data / name)
    capsys.readouterr()
    before = {path.name: path.read_bytes() for path in data.iterdir()}
    fails(
        capsys,
        merge(tools, "--input", data, "--output-prefix", data / "b_text_document"),
        f"folder '{data}' holds the pair b_text_document",
        "would overwrite",
        "choose another --output-prefix",
    )
    assert {path.name: path.read_bytes() for path in data.iterdir()} == before


@pytest.mark.parametrize("second", ["data/a_text_document", "./data/a_text_document", "link_text_document"])
def test_a_prefix_named_twice_is_refused(tools, tokenizer_model, corpus, tmp_path, capsys, monkeypatch, second):
    """As tools/preprocess_data.py refuses a file named twice: the .bin files are compared by realpath."""
    (tmp_path / "data").mkdir()
    preprocess(tools, tokenizer_model, corpus, tmp_path / "data" / "a")
    for ext in (".bin", ".idx"):
        os.symlink(tmp_path / "data" / f"a_text_document{ext}", tmp_path / f"link_text_document{ext}")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    fails(
        capsys,
        merge(tools, "--input", "data/a_text_document", second, "--output-prefix", "m"),
        "--input prefix 'data/a_text_document' is given twice",
        "list each prefix once",
    )
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".merge*"))


def test_several_folders_are_refused(tools, tokenizer_model, corpus, tmp_path, capsys):
    for name in ("w1", "w2"):
        (tmp_path / name).mkdir()
        preprocess(tools, tokenizer_model, corpus, tmp_path / name / "x")
    capsys.readouterr()
    for inputs in ([tmp_path / "w1", tmp_path / "w2"], [tmp_path / "w1", tmp_path / "w2" / "x_text_document"]):
        fails(
            capsys,
            merge(tools, "--input", *inputs, "--output-prefix", tmp_path / "m"),
            f"--input '{tmp_path / 'w1'}' is a folder",
            "only one folder is accepted",
        )
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("count", [1, 2])
def test_a_prefix_with_its_index_cache_folder_is_a_prefix(tools, tokenizer_model, corpus, tmp_path, count):
    """A prefix trained on has a folder of its own name (megatron's index cache, PREFIX/cache): it
    is still merged as a prefix, alone or with others, not taken for a folder of pairs."""
    prefixes = []
    for index in range(count):
        (tmp_path / f"w{index}").mkdir()
        preprocess(tools, tokenizer_model, corpus, tmp_path / f"w{index}" / "x")
        prefixes.append(tmp_path / f"w{index}" / "x_text_document")
        (prefixes[-1] / "cache").mkdir(parents=True)
    assert merge(tools, "--input", *prefixes, "--output-prefix", tmp_path / "m") == 0
    documents = sum(len(IndexedDataset(str(prefix))) for prefix in prefixes)
    assert len(IndexedDataset(str(tmp_path / "m"))) == documents
