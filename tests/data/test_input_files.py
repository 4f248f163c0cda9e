"""Which input files the data tools read, and how: each file once, all of a .zst file or an
error, a compression that agrees with the file's name, regular files of JSON Lines only (through
tools/preprocess_data.py and tools/train_tokenizer.py main)."""

import bz2
import gzip
import json
import lzma
import os
import threading

import pytest

from tests.data.conftest import write_jsonl
from tests.data.test_bad_inputs import assert_no_outputs, fails


def lines_read(capsys) -> int:
    out = capsys.readouterr().out
    return int(out.split("lines read: ")[1].split(",")[0])


@pytest.fixture
def preprocess(tools, tokenizer_model, tmp_path):
    (tmp_path / "out").mkdir()

    def run(*inputs, extra=()):
        argv = ["--input", *map(str, inputs), "--tokenizer-model", str(tokenizer_model)]
        return tools.preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "out" / "x"), *extra])

    return run


@pytest.fixture
def folder(tmp_path, tiny_records):
    """g/a.jsonl (3 documents), g/b.jsonl (4) and g/sub/c.jsonl (5)."""
    (tmp_path / "g" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "g" / "a.jsonl", tiny_records[:3])
    write_jsonl(tmp_path / "g" / "b.jsonl", tiny_records[3:7])
    write_jsonl(tmp_path / "g" / "sub" / "c.jsonl", tiny_records[7:12])
    return tmp_path / "g"


@pytest.mark.parametrize(
    "patterns, lines",
    [
        (["*.jsonl", "**/*.jsonl"], 12),  # ** also matches no folder: a.jsonl and b.jsonl twice
        (["a.jsonl", "*.jsonl"], 7),
        (["*.jsonl", "a.jsonl"], 7),
        (["**/c.jsonl", "sub/*.jsonl", "sub/../sub/c.jsonl"], 5),
    ],
)
def test_a_file_matched_by_several_patterns_is_read_once(preprocess, folder, capsys, caplog, patterns, lines):
    with caplog.at_level("INFO", logger="megatron_patch.data.inputs"):
        assert preprocess(*(folder / p for p in patterns)) == 0
    assert lines_read(capsys) == lines
    notes = [r.getMessage() for r in caplog.records if "patterns overlap" in r.getMessage()]
    assert len(notes) == 1 and "every file is read once" in notes[0]


def test_files_in_order_of_first_mention(preprocess, folder, tools, tokenizer_model, tmp_path, capsys):
    """De-duplication keeps each file at its first place: b then a, as if listed so."""
    assert preprocess(folder / "b.jsonl", folder / "*.jsonl") == 0
    (tmp_path / "ref").mkdir()
    argv = ["--input", str(folder / "b.jsonl"), str(folder / "a.jsonl"), "--tokenizer-model", str(tokenizer_model)]
    assert tools.preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "ref" / "x")]) == 0
    for ext in (".bin", ".idx"):
        got = (tmp_path / "out" / f"x_text_document{ext}").read_bytes()
        assert got == (tmp_path / "ref" / f"x_text_document{ext}").read_bytes()


@pytest.mark.parametrize("second", ["a.jsonl", "./a.jsonl", "link.jsonl"])
def test_a_file_named_twice_is_an_error(preprocess, folder, tools, capsys, second, tmp_path, monkeypatch):
    os.symlink(folder / "a.jsonl", folder / "link.jsonl")
    monkeypatch.chdir(folder)
    fails(
        capsys, preprocess("a.jsonl", "b.jsonl", second), "--input file 'a.jsonl' is given twice", "list each file once"
    )
    assert_no_outputs(tmp_path / "out")
    out = tmp_path / "tok"
    code = tools.train_tokenizer.main(
        ["--input", "a.jsonl", second, "--output-prefix", str(out), "--vocab-size", "300"]
    )
    fails(capsys, code, "given twice")
    assert not list(tmp_path.glob("tok*"))


@pytest.mark.parametrize("name", ["web[2024].jsonl", "*.jsonl"])
def test_an_existing_file_with_glob_characters_in_its_name_is_read(preprocess, tmp_path, tiny_records, capsys, name):
    """An existing path is taken as it is, not as a glob: that matched no file or other files
    (web2.jsonl matches both names as globs)."""
    path = write_jsonl(tmp_path / name, tiny_records[:3])
    write_jsonl(tmp_path / "web2.jsonl", tiny_records[3:8])
    assert preprocess(path) == 0
    assert lines_read(capsys) == 3


def _zst_corpus(zstandard, frames: int):
    """5000 JSON lines compressed as ``frames`` zstd frames, one after the other."""
    text = "".join(f'{{"text": "document {i}"}}\n' for i in range(5000)).encode()
    step = len(text) // frames
    cuts = [0] + [text.index(b"\n", step * k) + 1 for k in range(1, frames)] + [len(text)]
    compressor = zstandard.ZstdCompressor()
    data = b"".join(compressor.compress(text[a:b]) for a, b in zip(cuts, cuts[1:]))
    return data


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("partitions", ["1", "2"])  # 2: lines are counted first (count_lines_per_file)
def test_zst_is_read_whole_or_refused_when_truncated(preprocess, tmp_path, capsys, frames, partitions):
    zstandard = pytest.importorskip("zstandard")
    data = _zst_corpus(zstandard, frames)
    whole = tmp_path / "c.jsonl.zst"
    whole.write_bytes(data)
    assert preprocess(whole, extra=["--partitions", partitions]) == 0
    assert lines_read(capsys) == 5000
    for name, keep in [("cut.jsonl.zst", len(data) // 2), ("tail.jsonl.zst", len(data) - 1), ("head.jsonl.zst", 3)]:
        for written in (tmp_path / "out").iterdir():  # the pairs of the good run
            written.unlink()
        cut = tmp_path / name
        cut.write_bytes(data[:keep])
        fails(capsys, preprocess(cut, extra=["--partitions", partitions]), str(cut), "truncated or corrupt")
        assert_no_outputs(tmp_path / "out")


def test_zst_that_opens_with_a_skippable_frame_is_read(preprocess, tmp_path, capsys):
    """pzstd writes a skippable frame (magic 0x184D2A50-5F) before the data: still zstd."""
    zstandard = pytest.importorskip("zstandard")
    skippable = bytes([0x50, 0x2A, 0x4D, 0x18]) + (4).to_bytes(4, "little") + b"pzst"
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(skippable + _zst_corpus(zstandard, 1))
    assert preprocess(path) == 0
    assert lines_read(capsys) == 5000


def test_zst_with_trailing_garbage_is_refused(preprocess, tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(_zst_corpus(zstandard, 1) + b"not zstd at all")
    fails(capsys, preprocess(path), str(path), "truncated or corrupt")
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".jsonl.gz"])
def test_a_byte_order_mark_at_the_start_of_each_file_is_dropped(tools, tokenizer_model, tiny_records, tmp_path, suffix):
    """A UTF-8 byte-order mark (EF BB BF, as Windows editors write) at the start of an input file
    is not text: dropped as utf-8-sig drops it, for every file, so the pair is byte-identical to
    the one of the same files without it (before: line 1 was "malformed JSON", or in a .txt the
    mark was part of the first document)."""
    import gzip

    texts = [r["text"].split("\n")[0] for r in tiny_records[:6]]
    if suffix == ".txt":
        parts = ["".join(t + "\n" for t in texts[:3]), "".join(t + "\n" for t in texts[3:])]
    else:
        parts = ["".join(json.dumps({"text": t}) + "\n" for t in chunk) for chunk in (texts[:3], texts[3:])]

    def run(name: str, mark: bytes) -> bytes:
        (tmp_path / name).mkdir()
        paths = []
        for i, part in enumerate(parts):
            data = mark + part.encode("utf-8")
            path = tmp_path / name / f"{i}{suffix}"
            path.write_bytes(gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data)
            paths.append(str(path))
        argv = ["--input", *paths, "--tokenizer-model", str(tokenizer_model), "--append-eod"]
        assert tools.preprocess_data.main([*argv, "--output-prefix", str(tmp_path / name / "x")]) == 0
        return b"".join((tmp_path / name / f"x_text_document{ext}").read_bytes() for ext in (".bin", ".idx"))

    assert run("bom", b"\xef\xbb\xbf") == run("plain", b"")


JSONL = b'{"text": "a document"}\n{"text": "another one"}\n'


@pytest.mark.parametrize(
    "name, data, needles",
    [
        ("c.jsonl", gzip.compress(JSONL, mtime=0), ["is gzip-compressed but named .jsonl", "rename it '{path}.gz'"]),
        ("c.txt", gzip.compress(JSONL, mtime=0), ["is gzip-compressed but named .txt", "rename it '{path}.gz'"]),
        ("c.jsonl.gz", JSONL, ["is plain text, not gzip-compressed, but named .gz", "rename it '{stem}'"]),
        ("c.jsonl.gz", lzma.compress(JSONL), ["is xz-compressed but named .gz", "rename it '{stem}.xz'"]),
        ("c.jsonl.xz", gzip.compress(JSONL, mtime=0), ["is gzip-compressed but named .xz", "rename it '{stem}.gz'"]),
        ("c.jsonl", bz2.compress(JSONL), ["is bzip2-compressed, which the data tools do not read", ".gz, .xz or .zst"]),
        ("c.jsonl.gz", b"\x1f\x8c\x08" + bytes(20), ["does not start like a gzip file", "1f 8c 08", "damaged"]),
    ],
    ids=["gzip-as-jsonl", "gzip-as-txt", "plain-as-gz", "xz-as-gz", "gzip-as-xz", "bzip2", "damaged-gz"],
)
@pytest.mark.parametrize("skip", [[], ["--skip-bad-lines"]])
def test_compression_is_judged_by_content(preprocess, tmp_path, capsys, name, data, needles, skip):
    """The first bytes of a file must agree with its name: a gzip file named .jsonl was read as
    invalid UTF-8 (and with --skip-bad-lines a gzip named .txt became documents of binary
    garbage), a plain file named .gz was called truncated."""
    path = tmp_path / name
    path.write_bytes(data)
    stem = str(path)[: -len(path.suffix)]
    fails(capsys, preprocess(path, extra=skip), f"input '{path}'", *(n.format(path=path, stem=stem) for n in needles))
    assert_no_outputs(tmp_path / "out")


def test_a_pipe_is_refused_as_input(preprocess, tmp_path, capsys):
    """A FIFO (or /dev/stdin) gave "Illegal seek; the file looks truncated or corrupt"."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)

    def feed():  # a writer, so that reading it would not wait for ever
        try:
            with open(fifo, "wb") as stream:
                stream.write(JSONL)
        except OSError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    fails(capsys, preprocess(fifo), f"input '{fifo}' is not a regular file", "inputs must be regular files")
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
    writer.join(5)
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "text, query",
    [
        ('[\n  {"text": "a"},\n  {"text": "b"}\n]\n', "'.[]'"),
        ('[{"text": "a"},\n {"text": "b"}]\n', "'.[]'"),
        ('{\n  "text": "a"\n}\n', "."),
    ],
)
@pytest.mark.parametrize("skip", [[], ["--skip-bad-lines"]])
def test_a_pretty_printed_json_document_is_refused(preprocess, tmp_path, capsys, text, query, skip):
    """One JSON document over several lines was "pretty.json:1: malformed JSON ... fix or remove
    the line"; now it names the format expected and a conversion, also with --skip-bad-lines."""
    path = tmp_path / "pretty.json"
    path.write_text(text)
    needles = [f"{path}:1:", "inputs must be JSON Lines (one JSON object per line)", f"jq -c {query} '{path}'"]
    fails(capsys, preprocess(path, extra=skip), *needles)
    assert_no_outputs(tmp_path / "out")
