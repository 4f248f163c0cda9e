"""tools/preprocess_data.py and tools/merge_datasets.py on good input, and the checks of
--partitions runs: no earlier shard taken for part of a run, an input changed while read refused,
an empty shard reported."""

import gzip
import os

import numpy
import pytest

from megatron_patch.data import preprocess as preprocess_module
from tests.data.conftest import write_jsonl
from tests.data.test_bad_inputs import fails


def read_documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert dataset.index.dtype == numpy.uint16  # vocab 512 < 65500: DType.optimal_dtype
    return [dataset[i].tolist() for i in range(len(dataset))]


def run(tools, *argv) -> int:
    return tools.preprocess_data.main([str(a) for a in argv])


def files_of(folder, prefix) -> dict[str, bytes]:
    return {p.name[len(prefix) :]: p.read_bytes() for p in sorted(folder.glob(prefix + "*"))}


@pytest.mark.parametrize("append_eod", [True, False])
def test_round_trip_matches_tokenizer(tmp_path, tiny_records, tokenizer, tokenizer_model, tools, append_eod, capsys):
    records = tiny_records[60:72]
    corpus = write_jsonl(tmp_path / "in.jsonl", records)
    argv = ["--input", corpus, "--tokenizer-model", tokenizer_model, "--output-prefix", tmp_path / "out"] + (
        ["--append-eod"] if append_eod else []
    )
    assert run(tools, *argv) == 0
    expected = [tokenizer.tokenize(r["text"]) + ([tokenizer.eod] if append_eod else []) for r in records]
    assert read_documents(str(tmp_path / "out_text_document")) == expected
    report = capsys.readouterr().out
    assert f"{len(records)} documents, {sum(map(len, expected))} tokens" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_compressed_text_and_multiple_keys(tmp_path, tokenizer, tokenizer_model, tools):
    lines = ["First line of text.", "", "Second line, with 42 digits."]
    with gzip.open(tmp_path / "plain.txt.gz", "wt", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")
    assert (
        run(
            tools,
            "--input",
            tmp_path / "plain.txt.gz",
            "--tokenizer-model",
            tokenizer_model,
            "--output-prefix",
            tmp_path / "txt",
            "--append-eod",
        )
        == 0
    )
    expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in lines if t]
    assert read_documents(str(tmp_path / "txt_text_document")) == expected

    records = [{"title": "A title", "body": "Some body."}, {"title": "", "body": "Body two."}]
    write_jsonl(tmp_path / "two.jsonl", records)
    assert (
        run(
            tools,
            "--input",
            str(tmp_path / "two.json*"),
            "--json-keys",
            "title",
            "body",
            "--tokenizer-model",
            tokenizer_model,
            "--output-prefix",
            tmp_path / "kv",
        )
        == 0
    )
    assert read_documents(str(tmp_path / "kv_title_document")) == [tokenizer.tokenize("A title")]
    assert read_documents(str(tmp_path / "kv_body_document")) == [tokenizer.tokenize(r["body"]) for r in records]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, tiny_records):
    """30 documents with a few empty ones, as one JSONL file."""
    records = list(tiny_records[:30])
    records[3] = {"text": ""}
    records[17] = {"text": ""}
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "c.jsonl", records)


def test_workers_and_partitions_give_identical_bytes(tmp_path, corpus_file, tokenizer_model, tools, capsys):
    common = ["--input", corpus_file, "--tokenizer-model", tokenizer_model, "--append-eod", "--chunk-bytes", "20000"]
    for name, extra in [
        ("one", ["--workers", "1"]),
        ("two", ["--workers", "2"]),
        ("parts", ["--workers", "2", "--partitions", "3"]),
        ("nomerge", ["--partitions", "2", "--no-merge-partitions"]),
    ]:
        (tmp_path / name).mkdir()
        assert run(tools, *common, *extra, "--output-prefix", tmp_path / name / "c") == 0
    assert "28 documents" in capsys.readouterr().out
    single = files_of(tmp_path / "one", "c_text_document")
    assert set(single) == {".bin", ".idx"}
    assert files_of(tmp_path / "two", "c_text_document") == single
    assert files_of(tmp_path / "parts", "c_text_document") == single
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        f"c_{part}text_document.{ext}" for part in ["", "0_", "1_", "2_"] for ext in ["bin", "idx"]
    )
    assert not list((tmp_path / "nomerge").glob("c_text_document*"))
    shards = [str(tmp_path / "nomerge" / f"c_{i}_text_document") for i in range(2)]
    assert sum(len(read_documents(s)) for s in shards) == 28
    assert tools.merge_datasets.main(["--input", *shards, "--output-prefix", str(tmp_path / "merged")]) == 0
    assert files_of(tmp_path, "merged") == single
    # a folder as input: shards in natural order
    assert (
        tools.merge_datasets.main(["--input", str(tmp_path / "nomerge"), "--output-prefix", str(tmp_path / "fromdir")])
        == 0
    )
    assert files_of(tmp_path, "fromdir") == single


def test_report_counts_empty_documents(tmp_path, corpus_file, tokenizer_model, tools, capsys):
    assert (
        run(tools, "--input", corpus_file, "--tokenizer-model", tokenizer_model, "--output-prefix", tmp_path / "c") == 0
    )
    out = capsys.readouterr().out
    assert "lines read: 30, bad lines skipped: 0" in out
    assert "28 documents" in out and "2 empty kept as empty index entries" in out


def test_progress_lines(tmp_path, corpus_file, tokenizer_model, tools, caplog):
    with caplog.at_level("INFO", logger="megatron_patch.data.preprocess"):
        assert (
            run(
                tools,
                "--input",
                corpus_file,
                "--tokenizer-model",
                tokenizer_model,
                "--output-prefix",
                tmp_path / "c",
                "--log-interval",
                "10",
                "--chunk-bytes",
                "1",
            )
            == 0
        )
    lines = [r.getMessage() for r in caplog.records if "documents," in r.getMessage()]
    assert [line.split()[0] for line in lines] == ["10", "20", "30"]
    assert all("MB/s" in line and "tokens/s" in line and "ETA" in line for line in lines)


def test_earlier_outputs_a_run_would_not_replace_are_refused(tmp_path, corpus_file, tokenizer_model, tools, capsys):
    """Shards 2 and 3 of a 4-partition run left next to a 2-partition run's shards were merged as
    part of it by a folder merge (600 documents of a 400-line corpus); now every run that would
    leave such a pair beside its outputs refuses to start, and no file is changed."""
    out = tmp_path / "out"
    out.mkdir()

    def preprocess(*extra):
        return run(
            tools, "--input", corpus_file, "--tokenizer-model", tokenizer_model, "--output-prefix", out / "c", *extra
        )

    assert preprocess("--partitions", "4", "--no-merge-partitions") == 0
    before = files_of(out, "c_")
    needle = "remove them or choose another --output-prefix"
    fails(
        capsys, preprocess("--partitions", "2", "--no-merge-partitions"), "c_2_text_document, c_3_text_document", needle
    )
    fails(capsys, preprocess("--partitions", "3"), "c_3_text_document (.bin/.idx)", needle)
    fails(capsys, preprocess(), "4 earlier output pair(s)", "c_0_text_document", needle)
    assert files_of(out, "c_") == before
    for shard in (2, 3):
        for ext in (".bin", ".idx"):
            (out / f"c_{shard}_text_document{ext}").unlink()
    assert preprocess("--partitions", "2") == 0  # replaces shards 0 and 1, adds their merge
    # the merge of that run beside new unmerged shards: stale
    fails(capsys, preprocess("--partitions", "2", "--no-merge-partitions"), "1 earlier", "c_text_document", needle)
    assert preprocess("--partitions", "2") == 0  # a re-run replaces all it wrote
    # another dataset whose name extends the prefix with digits is no shard of it (no c_0 beside it)
    other = tmp_path / "other"
    other.mkdir()
    for ext in (".bin", ".idx"):
        os.replace(out / f"c_text_document{ext}", other / f"c_2023_text_document{ext}")
    out = other
    assert preprocess() == 0


@pytest.mark.parametrize("change, read", [(-2, "then read at least 30"), (3, "then read 30")])
def test_an_input_that_changes_while_read_is_refused(
    tmp_path, corpus_file, tokenizer_model, tools, capsys, monkeypatch, change, read
):
    """The lines are counted before they are read with --partitions; a file that grew since
    (a download still running) raised IndexError, one that shrank left the last shards empty."""
    counted = 30 + change
    monkeypatch.setattr(preprocess_module, "count_lines_per_file", lambda files: [counted])
    argv = ["--input", corpus_file, "--tokenizer-model", tokenizer_model, "--partitions", "4"]
    code = run(tools, *argv, "--output-prefix", tmp_path / "c")
    fails(
        capsys,
        code,
        f"input '{corpus_file}' changed while it was read",
        f"(counted {counted} lines, {read})",
        "wait until it is complete",
    )
    assert list(tmp_path.glob("c_*")) == []


@pytest.mark.parametrize("skip", ["--skip-bad-lines", "--skip-empty-documents"])
def test_a_shard_without_a_document_is_reported(tmp_path, tiny_records, tokenizer_model, tools, caplog, skip):
    records = [{"text": r["text"]} for r in tiny_records[:4]]
    tail = [b"{broken"] * 4 if skip == "--skip-bad-lines" else [b'{"text": ""}'] * 4
    path = write_jsonl(tmp_path / "c.jsonl", records)
    with open(path, "ab") as stream:
        stream.write(b"".join(line + b"\n" for line in tail))
    argv = ["--input", path, "--tokenizer-model", tokenizer_model, skip, "--partitions", "2", "--no-merge-partitions"]
    with caplog.at_level("WARNING", logger="megatron_patch.data.preprocess"):
        assert run(tools, *argv, "--output-prefix", tmp_path / "x") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"shard {tmp_path / 'x'}_1_text_document holds no document with text (its 4 input lines" in warnings[0]
