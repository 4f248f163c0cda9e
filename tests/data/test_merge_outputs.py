"""tools/merge_datasets.py and its output pair: never an input, never replaced unasked (--force),
a name the file system takes, a prefix without .bin/.idx, and Ctrl-C leaves nothing.

Every refusal comes before any merging and leaves every file as it was."""

import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from tests.data.test_bad_inputs import fails


def _pair(prefix, documents) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for document in documents:
        builder.add_document(numpy.array(document, dtype=numpy.uint16), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def pairs(tmp_path):
    """Two small pairs m/c_0_text_document and m/c_1_text_document."""
    (tmp_path / "m").mkdir()
    return [_pair(tmp_path / "m" / f"c_{i}_text_document", [[5, 6, 7, 2], [8 + i, 2]]) for i in range(2)]


def _files(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def no_merging(tools, monkeypatch):
    """Fail a test whose refusal comes after the merge started."""
    from megatron_patch.data import indexed

    def merge(*args, **kwargs):
        raise AssertionError("merged before checking the output")

    monkeypatch.setattr(indexed, "merge_datasets", merge)


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
def test_an_input_pair_as_output_is_refused(tools, pairs, tmp_path, capsys, no_merging, spelling):
    """The explicit-prefix form of the folder form's refusal: the input c_0 would be lost."""
    if spelling == "link":
        for ext in (".bin", ".idx"):
            os.symlink(pairs[0] + ext, tmp_path / f"link{ext}")
    output = {"same": pairs[0], "dotted": str(tmp_path / "m" / "." / "c_0_text_document"), "link": tmp_path / "link"}
    before = _files(tmp_path / "m")
    fails(
        capsys,
        tools.merge_datasets.main(["--input", *pairs, "--output-prefix", str(output[spelling]), "--force"]),
        f"--output-prefix '{output[spelling]}' would overwrite the input pair --input '{pairs[0]}'",
        "choose another --output-prefix",
    )
    assert _files(tmp_path / "m") == before


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_an_output_prefix_with_the_suffix_is_refused(tools, pairs, tmp_path, capsys, no_merging, ext):
    fails(
        capsys,
        tools.merge_datasets.main(["--input", *pairs, "--output-prefix", str(tmp_path / f"x{ext}")]),
        f"--output-prefix '{tmp_path / f'x{ext}'}' ends with {ext}",
        f"x{ext}.bin",
        "without .bin/.idx",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_existing_output_is_replaced_only_with_force(tools, pairs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "all"
    (tmp_path / "all.bin").write_bytes(b"an older merge")
    argv = ["--input", *pairs, "--output-prefix", str(out)]
    with monkeypatch.context() as patch:
        from megatron_patch.data import indexed

        patch.setattr(indexed, "merge_datasets", lambda *a: pytest.fail("merged before checking the output"))
        fails(
            capsys,
            tools.merge_datasets.main(argv),
            f"{out}.bin already exists",
            "pass --force to replace it, or choose another --output-prefix",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.bin", "m"]
    assert (tmp_path / "all.bin").read_bytes() == b"an older merge"
    assert tools.merge_datasets.main(argv + ["--force"]) == 0
    report = capsys.readouterr().out
    assert f"replaced {out}.bin" in report and f"replaced {out}.idx" not in report
    assert (tmp_path / "all.bin").read_bytes() != b"an older merge"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_file_name_too_long_is_refused_before_merging(tools, pairs, tmp_path, capsys, no_merging):
    output = tmp_path / ("x" * 253)  # 257 bytes with .bin
    fails(
        capsys,
        tools.merge_datasets.main(["--input", *pairs, "--output-prefix", str(output)]),
        "would be 257 bytes, over the 255 a file name may have",
        "shorten the file name part of --output-prefix",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ctrl_c_leaves_nothing(tools, pairs, tmp_path, capsys, monkeypatch):
    from megatron_patch.data import indexed

    def interrupted(prefixes, bin_path, idx_path):
        with open(bin_path, "wb") as stream:
            stream.write(b"half")  # a merge under way
        raise KeyboardInterrupt

    monkeypatch.setattr(indexed, "merge_datasets", interrupted)
    try:
        code = tools.merge_datasets.main(["--input", *pairs, "--output-prefix", str(tmp_path / "all")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    fails(capsys, code, "error: interrupted; nothing was written", exit_code=130)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
