"""A lone surrogate escape ("\\ud800") in a JSON string is valid JSON but no Unicode character:
every reader of corpus lines (preprocess, tokenizer training, the evaluation text reader) stops at
it with ``file`` and line, one line, and the fix; a surrogate pair is a character and is kept."""

import pytest

from megatron_patch.errors import DataError
from tests.data.test_bad_inputs import assert_no_outputs, fails

GOOD = b'{"text": "A perfectly good document about tokens and bytes."}'
LONE = b'{"text": "before \\ud800 after"}'  # the JSON text holds the six characters \ud800
PAIR = b'{"text": "a smile \\ud83d\\ude00 here"}'


def corpus(path, *bad_lines):
    path.write_bytes(b"".join(line + b"\n" for line in [GOOD, PAIR, GOOD, *bad_lines, GOOD]))
    return path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_names_file_and_line(tools, tokenizer_model, tmp_path, capsys, workers):
    path = corpus(tmp_path / "c.jsonl", LONE)
    (tmp_path / "out").mkdir()
    argv = ["--input", str(path), "--tokenizer-model", str(tokenizer_model), "--workers", workers]
    code = tools.preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "out" / "x")])
    fails(capsys, code, f"{path}:4:", "lone surrogate \\ud800", "--skip-bad-lines")
    assert_no_outputs(tmp_path / "out")


def test_train_tokenizer_names_file_and_line(tools, tmp_path, capsys):
    path = corpus(tmp_path / "c.jsonl", LONE)
    argv = ["--input", str(path), "--vocab-size", "300", "--output-prefix", str(tmp_path / "spm")]
    line = fails(capsys, tools.train_tokenizer.main(argv), f"{path}:4:", "lone surrogate \\ud800", "--skip-bad-lines")
    assert "SentencePiece training failed" not in line and "--vocab-size" not in line
    assert not list(tmp_path.glob("spm*")) and not list(tmp_path.glob(".train_tokenizer*"))


def test_train_tokenizer_skips_it_when_asked(tools, tiny_records, tmp_path, capsys):
    import json

    text = "\n".join(json.dumps({"text": r["text"]}) for r in tiny_records[:30]).encode()
    path = tmp_path / "c.jsonl"
    path.write_bytes(text + b"\n" + LONE + b"\n" + PAIR + b"\n")
    argv = ["--input", str(path), "--vocab-size", "400", "--output-prefix", str(tmp_path / "spm")]
    assert tools.train_tokenizer.main([*argv, "--skip-bad-lines"]) == 0, capsys.readouterr().err
    assert "(1 bad input lines skipped" in capsys.readouterr().out


def test_evaluation_text_reader_names_file_and_line(tokenizer, tmp_path):
    from megatron_patch.evaluation.token_stream import corpus_from_files

    path = corpus(tmp_path / "e.jsonl", GOOD, LONE)
    with pytest.raises(DataError) as error:
        corpus_from_files([str(path)], tokenizer)
    message = str(error.value)
    assert f"{path}, line 5:" in message and "lone surrogate \\ud800" in message and "\n" not in message


def test_a_surrogate_pair_is_one_character(tokenizer, tmp_path):
    from megatron_patch.evaluation.token_stream import corpus_from_files

    path = corpus(tmp_path / "e.jsonl")
    stream = corpus_from_files([str(path)], tokenizer)
    assert stream.documents == 4
    assert stream.text_bytes == 3 * len(b"A perfectly good document about tokens and bytes.") + len(
        "a smile \U0001f600 here".encode()
    )
