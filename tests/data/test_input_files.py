"""Which input files the data tools read, and how: each file once, and all of a .zst file or an
error (through tools/preprocess_data.py and tools/train_tokenizer.py main)."""

import pytest

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


def _zst_corpus(tmp_path, zstandard, frames: int):
    """5000 JSON lines compressed as ``frames`` zstd frames, one after the other."""
    text = "".join(f'{{"text": "document {i}"}}\n' for i in range(5000)).encode()
    step = len(text) // frames
    cuts = [0] + [text.index(b"\n", step * k) + 1 for k in range(1, frames)] + [len(text)]
    compressor = zstandard.ZstdCompressor()
    data = b"".join(compressor.compress(text[a:b]) for a, b in zip(cuts, cuts[1:]))
    return data


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("partitions", ["1", "2"])  # 2: lines are counted first (count_lines)
def test_zst_is_read_whole_or_refused_when_truncated(preprocess, tmp_path, capsys, frames, partitions):
    zstandard = pytest.importorskip("zstandard")
    data = _zst_corpus(tmp_path, zstandard, frames)
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


def test_zst_with_trailing_garbage_is_refused(preprocess, tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(_zst_corpus(tmp_path, zstandard, 1) + b"not zstd at all")
    fails(capsys, preprocess(path), str(path), "truncated or corrupt")
    assert_no_outputs(tmp_path / "out")
