"""A checkpoint whose recorded tokenizer is gone (the checkpoint was copied to another machine, or
the tokenizer moved): every tool that reads it (evaluate.py, export_hf.py, convert_checkpoint.py,
evaluate_zero_shot.py through the export) stops with one line naming the recorded path, the
checkpoint and --tokenizer-model, exit code 2, nothing written; with --tokenizer-model pointing at
the tokenizer's new place, evaluate.py and export_hf.py give what they give on the original."""

import json
import os
import shutil

import pytest

from tests.conftest import REPO_ROOT
from tests.tools.common import assert_one_line_error, call, copy_recording, leftovers
from tools import convert_checkpoint, evaluate, evaluate_zero_shot, export_hf

TEXTS = ["It was the best of times, it was the worst of times.", "Alice was beginning to get very tired."]


def _moved(trained, tmp_path, source):
    """``(checkpoint, recorded, new)``: a copy of the checkpoint ``source`` trained with ``recorded``,
    which has since moved to ``new``."""
    recorded, new = tmp_path / "machine_a" / "tok.model", tmp_path / "machine_b" / "tok.model"
    recorded.parent.mkdir()
    new.parent.mkdir()
    shutil.copy(trained["corpus"]["tokenizer"], recorded)
    checkpoint = copy_recording(source, tmp_path / "copied", tokenizer_model=str(recorded))
    os.rename(recorded, new)
    return checkpoint, recorded, new


@pytest.fixture
def moved(trained, tmp_path):
    """:func:`_moved` of the run's final (token-stage) checkpoint."""
    return _moved(trained, tmp_path, trained["final"])


def _assert_names_the_move(code, err, checkpoint, recorded):
    assert_one_line_error(code, err, f"tokenizer {recorded}, recorded in checkpoint {checkpoint}")
    assert "pass the tokenizer's path with --tokenizer-model" in err[0], err[0]


def test_evaluate(trained, moved, tmp_path, capsys):
    checkpoint, recorded, new = moved
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    output = tmp_path / "out.json"
    code, _, err = call(evaluate, ["--cpu", "--load", checkpoint, "--input", data, "--output-json", output], capsys)
    _assert_names_the_move(code, err, checkpoint, recorded)
    assert not output.exists() and not leftovers(tmp_path)

    argv = ["--cpu", "--input", data, "--output-json", output]
    code, _, err = call(evaluate, [*argv, "--load", checkpoint, "--tokenizer-model", new], capsys)
    assert code == 0, err
    report = json.loads(output.read_text())
    code, _, err = call(evaluate, [*argv[:-1], tmp_path / "original.json", "--load", trained["final"]], capsys)
    assert code == 0, err
    original = json.loads((tmp_path / "original.json").read_text())
    assert report["tokenizer_model"] == str(new)
    assert (report["tokens"], report["loss"]) == (original["tokens"], original["loss"])


def test_export_hf(trained, moved, tmp_path, capsys):
    pytest.importorskip("safetensors")
    checkpoint, recorded, new = moved
    save = tmp_path / "hf"
    code, _, err = call(export_hf, ["--cpu", "--load", checkpoint, "--save", save], capsys)
    _assert_names_the_move(code, err, checkpoint, recorded)
    assert not save.exists() and not leftovers(tmp_path)

    code, _, err = call(export_hf, ["--cpu", "--load", checkpoint, "--save", save, "--tokenizer-model", new], capsys)
    assert code == 0, err
    assert (save / "tokenizer.model").read_bytes() == new.read_bytes()
    assert json.loads((save / "megatron_patch_export.json").read_text())["tokenizer_model"] == str(new)


def test_convert_checkpoint(trained, tmp_path, capsys):
    checkpoint, recorded, _ = _moved(trained, tmp_path, trained["patch"])  # the tool converts patch-stage weights
    save = tmp_path / "converted"
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", checkpoint, "--save", save], capsys)
    _assert_names_the_move(code, err, checkpoint, recorded)
    assert not save.exists() and not leftovers(tmp_path)


def test_evaluate_zero_shot_through_the_export(moved, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    checkpoint, recorded, _ = moved
    output = tmp_path / "zero_shot.json"
    argv = ["--cpu", "--load", checkpoint, "--tasks", "tiny_next_sentence", "--output-json", output]
    code, _, err = call(evaluate_zero_shot, argv, capsys)
    _assert_names_the_move(code, err, checkpoint, recorded)
    assert not output.exists()


def test_a_recorded_file_that_is_no_tokenizer_names_the_checkpoint(trained, tmp_path, capsys):
    recorded = tmp_path / "tok.model"
    recorded.write_bytes(b"not a sentencepiece model")
    checkpoint = copy_recording(trained["final"], tmp_path / "copied", tokenizer_model=str(recorded))
    save = tmp_path / "hf"
    code, _, err = call(export_hf, ["--cpu", "--load", checkpoint, "--save", save], capsys)
    assert_one_line_error(code, err, f"checkpoint {checkpoint}'s tokenizer: tokenizer model '{recorded}'")
    assert "is not a SentencePiece model" in err[0] and "--tokenizer-model" in err[0]
    assert not save.exists()


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, trained):
    """A tokenizer of 500 pieces trained on the same corpus: it pads to the same 576 rows as the
    checkpoint's 512, so only its pieces tell it apart."""
    from tools import train_tokenizer

    folder = tmp_path_factory.mktemp("other_tokenizer")
    source = str(REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz")
    assert train_tokenizer.main(["--input", source, "--vocab-size", "500", "--output-prefix", str(folder / "tok")]) == 0
    return folder / "tok.model"


@pytest.mark.parametrize("tool", ["evaluate", "export_hf"])
def test_another_tokenizer_of_the_same_size_is_refused_where_the_recorded_one_is_gone(
    trained, moved, other_tokenizer, tmp_path, capsys, tool
):
    """The checkpoint records its tokenizer's pieces (sha256), so a wrong --tokenizer-model is found
    even where the recorded file cannot be read to compare (before: a warning, and wrong results)."""
    checkpoint, recorded, _ = moved
    if tool == "evaluate":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
        output = tmp_path / "out.json"
        argv = ["--cpu", "--input", data, "--output-json", output]
        code, _, err = call(evaluate, [*argv, "--load", checkpoint, "--tokenizer-model", other_tokenizer], capsys)
    else:
        pytest.importorskip("safetensors")
        output = tmp_path / "hf"
        argv = ["--cpu", "--save", output, "--load", checkpoint, "--tokenizer-model", other_tokenizer]
        code, _, err = call(export_hf, argv, capsys)
    assert_one_line_error(code, err, f"tokenizer {other_tokenizer} has another vocabulary than the one checkpoint")
    assert f"({recorded}, pieces sha256 " in err[0] and "pass that one as --tokenizer-model" in err[0]
    assert not output.exists() and not leftovers(tmp_path)
