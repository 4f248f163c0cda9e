"""Bad input to the data tools: one-line `error: ...` naming value, file:line and fix; exit code
2; no traceback; no .bin/.idx (nor staging folder) left behind."""

import errno
import importlib.util
import lzma
import os
import signal
import subprocess
import sys

import numpy
import pytest

from megatron_patch.data import preprocess as preprocess_module
from tests.data.conftest import REPO_ROOT, write_jsonl

GOOD = {"text": "A perfectly good document.", "source": "test"}


def fails(capsys, code: int, *needles: str, exit_code: int = 2) -> str:
    """Check a one-line error exit (a user error's code by default) and return the error line."""
    assert code == exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_no_outputs(folder) -> None:
    left = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".idx", ".tmp")]
    assert left == []


@pytest.fixture
def preprocess(tools, tokenizer_model, tmp_path):
    """Run preprocess_data.main on ``inputs`` into tmp_path/out/x; returns the exit code."""
    (tmp_path / "out").mkdir()

    def run(*inputs, extra=(), model=tokenizer_model, prefix=None):
        argv = [
            "--input",
            *map(str, inputs),
            "--tokenizer-model",
            str(model),
            "--output-prefix",
            str(prefix or tmp_path / "out" / "x"),
            *extra,
        ]
        return tools.preprocess_data.main(argv)

    return run


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_malformed_json_names_file_and_line(preprocess, tmp_path, capsys, workers):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 5)
    with open(path, "a") as stream:
        stream.write('{"text": "unterminated\n')
    write_jsonl(tmp_path / "d.jsonl", [GOOD])
    code = preprocess(path, tmp_path / "d.jsonl", extra=["--workers", workers])
    fails(capsys, code, f"{path}:6:", "malformed JSON", "--skip-bad-lines")
    assert_no_outputs(tmp_path / "out")


def test_skip_bad_lines_counts_and_reports(preprocess, tmp_path, capsys):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            b'{"text": "good one"}',
            b"{broken",
            b"[1, 2]",
            b'{"other": "x"}',
            b'{"text": "bad \xff byte"}',
            b'{"text": "good two"}',
        ],
    )
    assert preprocess(path, extra=["--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "lines read: 6, bad lines skipped: 4" in out and "2 documents" in out


HUGE_INTEGER = b'{"text": "x", "n": ' + b"1" * 5000 + b"}"
DEEP_NESTING = b'{"text": "x", "n": ' + b"[" * 20000 + b"]" * 20000 + b"}"


@pytest.mark.parametrize(
    "line, reason", [(HUGE_INTEGER, "an integer of more than 4300 digits"), (DEEP_NESTING, "nested too deeply")]
)
def test_json_beyond_pythons_limits_is_a_bad_line(preprocess, tools, tokenizer_model, tmp_path, capsys, line, reason):
    """json.loads raises ValueError (not JSONDecodeError) for a number over Python's limit on
    digits and RecursionError for deep nesting: bad lines like any other malformed JSON. The run
    with worker processes is the tool in a process of its own, as users run it: forked from this
    test process after the trainer's tests have run in it (their threads), a worker's garbage
    collection during the deep parse can crash in CPython."""
    path = write_lines(tmp_path / "c.jsonl", [b'{"text": "good one"}', line, b'{"text": "good two"}'])
    fails(capsys, preprocess(path), f"{path}:2: malformed JSON ({reason}", "--skip-bad-lines")
    assert_no_outputs(tmp_path / "out")
    argv = ["--input", path, "--tokenizer-model", tokenizer_model, "--output-prefix", tmp_path / "out" / "x"]
    command = [sys.executable, REPO_ROOT / "tools" / "preprocess_data.py", *argv, "--skip-bad-lines", "--workers", "2"]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "lines read: 3, bad lines skipped: 1" in done.stdout, done.stdout + done.stderr
    code = tools.train_tokenizer.main(["--input", str(path), "--output-prefix", str(tmp_path / "out" / "t")])
    fails(capsys, code, f"{path}:2: malformed JSON ({reason}", "--skip-bad-lines")
    assert not list((tmp_path / "out").glob("t.*"))


def test_plain_text_with_several_keys_names_the_file_and_the_keys(preprocess, tools, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n")
    needles = [f"input '{path}' is plain text", "--json-keys gives 2 keys (text title)", "a single --json-keys key"]
    fails(capsys, preprocess(path, extra=["--json-keys", "text", "title"]), *needles)
    argv = ["--input", str(path), "--json-keys", "text", "title", "--output-prefix", str(tmp_path / "out" / "t")]
    fails(capsys, tools.train_tokenizer.main(argv), *needles)
    assert list((tmp_path / "out").iterdir()) == []


def test_keys_whose_outputs_share_a_name_are_refused_before_reading(preprocess, tmp_path, capsys, monkeypatch):
    """With --partitions, the merge of key '0_a' and shard 0 of key 'a' are both PREFIX_0_a_document."""

    def no_reading(*args, **kwargs):
        raise AssertionError("read the input before checking the output names")

    monkeypatch.setattr(preprocess_module, "expand_inputs", no_reading)
    path = write_jsonl(tmp_path / "c.jsonl", [{"a": "one", "0_a": "two"}] * 4)
    fails(
        capsys,
        preprocess(path, extra=["--json-keys", "a", "0_a", "--partitions", "2"]),
        "--json-keys '0_a' and 'a' would both write",
        f"{tmp_path / 'out' / 'x'}_0_a_document.bin",
        "rename one key",
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_key(preprocess, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, {"body": "no text key", "source": "s"}])
    fails(capsys, preprocess(path), f"{path}:2:", "missing key 'text'", "'body'", "--json-keys")
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "key, needles",
    [
        ("a/b", ["--json-keys 'a/b'", "cannot hold '/'", "rename the key in the input files", "'a_b'"]),
        ("k" * 300, ["--json-keys 'kkkk", "bytes", "shorten the key"]),
    ],
)
def test_a_json_key_that_cannot_be_in_a_file_name(preprocess, tmp_path, capsys, key, needles):
    """The key is part of the output file names (PREFIX_{key}_document.bin): one that cannot be
    is refused before any input is read."""
    path = write_jsonl(tmp_path / "c.jsonl", [{key: "some text"}])
    fails(capsys, preprocess(path, extra=["--json-keys", "text", key]), *needles)
    assert list((tmp_path / "out").iterdir()) == []


def test_text_that_is_not_a_string(preprocess, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, {"text": 17}])
    fails(capsys, preprocess(path), f"{path}:3:", "key 'text' holds a JSON int")
    assert_no_outputs(tmp_path / "out")


def test_invalid_utf8_names_file_and_line(preprocess, tmp_path, capsys):
    path = write_lines(tmp_path / "c.jsonl", [b'{"text": "ok"}'] * 3 + [b'{"text": "caf\xe9"}'])
    fails(capsys, preprocess(path), f"{path}:4:", "invalid UTF-8", "0xe9", "iconv")
    assert_no_outputs(tmp_path / "out")


def test_empty_documents_are_counted_not_errors(preprocess, tmp_path, capsys):
    path = write_lines(
        tmp_path / "c.jsonl", [b'{"text": "one"}', b'{"text": ""}', b"", b'{"text": null}', b'{"text": "two"}']
    )
    assert preprocess(path) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "3 empty kept as empty index entries" in out


def test_only_empty_documents_is_an_error(preprocess, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": ""}] * 3)
    fails(capsys, preprocess(path), "no document with text under key 'text'", "3 empty")
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize("chunk_bytes", ["0", "-5"])
def test_a_chunk_size_below_one_byte_is_refused(preprocess, tmp_path, capsys, chunk_bytes):
    """Before: accepted (every line became a chunk of its own)."""
    corpus = write_lines(tmp_path / "c.jsonl", [b'{"text": "hello"}'])
    fails(capsys, preprocess(corpus, extra=["--chunk-bytes", chunk_bytes]), f"--chunk-bytes {chunk_bytes} must be >= 1")
    assert_no_outputs(tmp_path / "out")


def test_missing_input_and_empty_glob(preprocess, tmp_path, capsys):
    fails(capsys, preprocess(tmp_path / "nope.jsonl"), "--input file", "nope.jsonl", "does not exist")
    fails(capsys, preprocess(str(tmp_path / "*.jsonl.xz")), "--input glob", "*.jsonl.xz", "matches no file")
    write_jsonl(tmp_path / "c.csv", [GOOD])
    fails(capsys, preprocess(tmp_path / "c.csv"), "c.csv", "unknown format", "*.jsonl")
    assert_no_outputs(tmp_path / "out")


def test_missing_output_folder(preprocess, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    missing = tmp_path / "no" / "such"
    fails(capsys, preprocess(path, prefix=missing / "x"), f"output folder '{missing}'", "does not exist", "mkdir -p")
    assert not missing.exists()


def test_output_folder_that_is_a_file(preprocess, tools, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    afile = tmp_path / "afile"
    afile.write_text("")
    needles = [f"output folder '{afile}'", "is a file, not a folder", "choose a folder"]
    fails(capsys, preprocess(path, prefix=afile / "x"), *needles)
    fails(capsys, tools.train_tokenizer.main(["--input", str(path), "--output-prefix", str(afile / "t")]), *needles)
    fails(capsys, preprocess(path, prefix=afile / "sub" / "x"), f"'{afile}' is a file", "choose a folder")
    assert afile.read_text() == ""


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write to an open file: no file name


def test_a_full_disk_names_the_output_folder(preprocess, tools, tmp_path, capsys, monkeypatch, corpus_prefix):
    from megatron_patch.data import indexed

    out = tmp_path / "out"
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 3)
    needles = [f"output folder '{out}'", "No space left on device", "free space there", "nothing was written"]
    monkeypatch.setattr(preprocess_module._Writers, "add", _disk_full)
    fails(capsys, preprocess(path), *needles)
    assert_no_outputs(out)
    monkeypatch.setattr(indexed, "merge_datasets", _disk_full)
    fails(capsys, tools.merge_datasets.main(["--input", corpus_prefix, "--output-prefix", str(out / "m")]), *needles)
    assert_no_outputs(out)


@pytest.mark.parametrize("content", [None, b"\x00garbage"])
def test_unreadable_tokenizer_model(preprocess, tmp_path, capsys, content):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    model = tmp_path / "bad.model"
    if content is not None:
        model.write_bytes(content)
    fails(capsys, preprocess(path, model=model), str(model), "tools/train_tokenizer.py")
    assert_no_outputs(tmp_path / "out")


def test_truncated_xz(preprocess, tmp_path, capsys, tiny_records):
    data = lzma.compress("".join(f'{{"text": "{i}"}}\n' for i in range(5000)).encode())
    path = tmp_path / "c.jsonl.xz"
    path.write_bytes(data[: len(data) // 2])
    fails(capsys, preprocess(path), str(path), "truncated or corrupt")
    assert_no_outputs(tmp_path / "out")


def test_zstd_without_zstandard(preprocess, tmp_path, capsys):
    if importlib.util.find_spec("zstandard") is not None:
        pytest.skip("zstandard is installed; the missing-module error cannot happen")
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    fails(capsys, preprocess(path), str(path), "pip install zstandard")
    assert_no_outputs(tmp_path / "out")


def test_too_many_partitions(preprocess, tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 2)
    fails(capsys, preprocess(path, extra=["--partitions", "3"]), "--partitions 3", "2 input lines")
    assert_no_outputs(tmp_path / "out")


def test_merge_errors(tools, tmp_path, capsys, corpus_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    merge = tools.merge_datasets.main
    out = str(tmp_path / "m")
    fails(
        capsys,
        merge(["--input", str(tmp_path / "absent"), "--output-prefix", out]),
        "absent",
        "not found",
        "tools/preprocess_data.py",
    )
    fails(capsys, merge(["--input", corpus_prefix, "--output-prefix", str(tmp_path / "x" / "m")]), "does not exist")
    builder = IndexedDatasetBuilder(str(tmp_path / "wide.bin"), dtype=numpy.int32)
    builder.add_document(numpy.arange(5), [5])
    builder.finalize(str(tmp_path / "wide.idx"))
    fails(
        capsys,
        merge(["--input", corpus_prefix, str(tmp_path / "wide"), "--output-prefix", out]),
        "int32",
        "uint16",
        "same tokenizer",
    )
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".merge*"))


def test_bad_flags_are_one_line_errors(tools, tmp_path, capsys):
    fails(capsys, tools.preprocess_data.main(["--input", "x.jsonl"]), "--tokenizer-model", "--help")
    fails(
        capsys,
        tools.merge_datasets.main(["--input", "a", "--output-prefix", "b", "--bogus"]),
        "--bogus",
        "tools/merge_datasets.py --help",
    )
    fails(
        capsys,
        tools.train_tokenizer.main(["--input", "x", "--output-prefix", "y", "--vocab-size", "many"]),
        "--vocab-size",
        "many",
    )


def _copy_pair(prefix, folder):
    import shutil

    copy = str(folder / "copy_text_document")
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, copy + ext)
    return copy


def _cut(path, keep):
    with open(path, "r+b") as stream:
        stream.truncate(keep(len(open(path, "rb").read())))


def _shifted_offset(idx):
    """Overwrite sequence 3's byte offset (int64 after the 34-byte header and S int32 lengths)."""
    import struct

    data = bytearray(open(idx, "rb").read())
    (sequences,) = struct.unpack("<Q", data[18:26])
    at = 34 + 4 * sequences + 8 * 3
    data[at : at + 8] = struct.pack("<q", struct.unpack("<q", data[at : at + 8])[0] + 2)
    open(idx, "wb").write(bytes(data))


PAIR_DAMAGE = {
    "truncated-bin": (lambda p: _cut(p + ".bin", lambda n: n - 100), ".bin has", "truncated"),
    "extended-bin": (lambda p: open(p + ".bin", "ab").write(b"\0\0"), ".bin has", "longer than its index"),
    "empty-idx": (lambda p: open(p + ".idx", "wb").close(), ".idx is not a megatron index file (0 bytes"),
    "random-idx": (
        lambda p: open(p + ".idx", "wb").write(numpy.random.default_rng(3).bytes(2048)),
        ".idx is not a megatron index file",
    ),
    "truncated-idx": (lambda p: _cut(p + ".idx", lambda n: n - 8), ".idx has", "header's"),
    "shifted-offset": (lambda p: _shifted_offset(p + ".idx"), ".idx: sequence 3 has length"),
}


@pytest.mark.parametrize("case", list(PAIR_DAMAGE))
def test_damaged_pair_is_refused_by_merge_and_check_prefix(tools, tmp_path, capsys, corpus_prefix, case):
    """One line naming the damaged file and the fix, from the check every reader of a prefix
    runs first (merge here; the trainer's datasets and evaluate through the same check_prefix)."""
    from megatron_patch.data.indexed import check_prefix
    from megatron_patch.errors import DataError

    damage, *needles = PAIR_DAMAGE[case]
    copy = _copy_pair(corpus_prefix, tmp_path)
    damage(copy)
    with pytest.raises(DataError) as error:
        check_prefix(copy)
    assert "\n" not in str(error.value) and copy in str(error.value)
    out = str(tmp_path / "m")
    line = fails(
        capsys,
        tools.merge_datasets.main(["--input", corpus_prefix, copy, "--output-prefix", out]),
        *needles,
        "tools/preprocess_data.py",
    )
    assert copy in line
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m*"))


def test_intact_pairs_pass_the_check(corpus_prefix, tmp_path):
    """The check accepts what preprocessing and megatron's builder write, empty documents included."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_patch.data.indexed import check_prefix

    check_prefix(corpus_prefix)
    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=numpy.uint16)
    builder.add_document(numpy.arange(5), [5])
    builder.end_document()  # an empty document: an index entry without a sequence
    builder.add_document(numpy.arange(3), [3])
    builder.finalize(str(tmp_path / "e.idx"))
    check_prefix(str(tmp_path / "e"))


ENCODE_IN_WORKER = preprocess_module._encode_in_worker


def _encode_or_die(fmt, lines):
    """The worker's encoding, except that a chunk holding the marker kills its process outright."""
    if any(b"kill this worker" in line for line in lines):
        os.kill(os.getpid(), signal.SIGKILL)
    return ENCODE_IN_WORKER(fmt, lines)


def test_a_worker_killed_by_a_signal_stops_the_run_with_one_line(preprocess, tmp_path, capsys, monkeypatch):
    """multiprocessing.Pool waited for ever for the task of a worker the OOM killer took; the
    process pool now reports it: one line, exit 1, nothing written."""
    monkeypatch.setattr(preprocess_module, "_encode_in_worker", _encode_or_die)  # the workers fork with it
    records = [GOOD] * 30 + [{"text": "kill this worker"}] + [GOOD] * 30
    path = write_jsonl(tmp_path / "c.jsonl", records)
    code = preprocess(path, extra=["--workers", "2", "--chunk-bytes", "64"])
    fails(capsys, code, "a tokenizing worker process died", "fewer --workers", exit_code=1)
    assert_no_outputs(tmp_path / "out")
