"""SentencePieceTokenizer and tools/train_tokenizer.py."""

import pickle

import pytest

from tests.data.conftest import TOKENIZER_VOCAB, write_jsonl
from tests.data.test_bad_inputs import fails


def test_special_ids_and_megatron_interface(tokenizer):
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == TOKENIZER_VOCAB == len(tokenizer.vocab)
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    assert [tokenizer.piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.eos == tokenizer.eod
    assert tokenizer.vocab["</s>"] == tokenizer.eod


def test_round_trip_and_byte_fallback(tokenizer, tiny_records):
    text = tiny_records[50]["text"][:3000]
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.eod not in ids and tokenizer.pad not in ids
    assert tokenizer.detokenize(ids) == text
    rare = "naïve café 1234 — ✓ 漢字\n\tindent"
    assert tokenizer.detokenize(tokenizer.tokenize(rare)) == rare
    digits = [tokenizer.detokenize([i]) for i in tokenizer.tokenize("1234567890 2024")]
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in digits)  # digits split


def test_unique_identifiers_hold_class_and_sha256(tokenizer, tokenizer_model):
    import hashlib

    ids = tokenizer.unique_identifiers
    assert "SentencePieceTokenizer" in ids["class"]
    assert ids["sha256"] == hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()


def test_pickle_round_trip(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.tokenize("Hello world") == tokenizer.tokenize("Hello world")
    assert clone.unique_identifiers == tokenizer.unique_identifiers


@pytest.mark.parametrize("content", [None, b"not a sentencepiece model"])
def test_unreadable_model_is_a_data_error_naming_the_path(tmp_path, content):
    """A DataError (the tools report it as one line, exit code 2), still a ValueError for callers
    that catch that."""
    from megatron_patch.data.tokenizer import SentencePieceTokenizer
    from megatron_patch.errors import DataError

    path = tmp_path / "broken.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        SentencePieceTokenizer(str(path))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(path) in message and "tools/train_tokenizer.py" in message
    assert "\n" not in message


def test_training_is_deterministic_and_atomic(tmp_path, tiny_records, tools, tokenizer_model):
    corpus = write_jsonl(tmp_path / "slice.jsonl", tiny_records[:40])
    argv = [
        "--input",
        str(corpus),
        "--vocab-size",
        str(TOKENIZER_VOCAB),
        "--input-sentence-size",
        "12000",
        "--seed",
        "7",
    ]
    assert tools.train_tokenizer.main(argv + ["--output-prefix", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.model").read_bytes() == tokenizer_model.read_bytes()
    assert (tmp_path / "again.vocab").read_text(encoding="utf-8").splitlines()[2] == "</s>\t0"
    # another seed samples other lines, hence another model
    assert tools.train_tokenizer.main(argv[:-1] + ["8", "--output-prefix", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other.model").read_bytes() != tokenizer_model.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.model",
        "again.vocab",
        "other.model",
        "other.vocab",
        "slice.jsonl",
    ]


def test_training_errors_are_one_line(tmp_path, tools, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b c"}])
    code = tools.train_tokenizer.main(
        ["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "t")]
    )
    assert code == 2
    code = tools.train_tokenizer.main(
        ["--input", str(corpus), "--vocab-size", "100", "--output-prefix", str(tmp_path / "t")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --input file") and "missing.jsonl" in err[0]
    assert err[1].startswith("error: --vocab-size 100 is too small")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--seed", "-1", "[0, 4294967295]"),
        ("--seed", "4294967296", "[0, 4294967295]"),
        ("--vocab-size", "3000000000", "[300, 2147483647]"),
        ("--num-threads", "100000", "[1, 1024]"),
        ("--num-threads", "0", "[1, 1024]"),
    ],
)
def test_numbers_out_of_range_are_refused_at_parsing(tmp_path, tools, capsys, monkeypatch, flag, value, allowed):
    def no_reading(*args, **kwargs):
        raise AssertionError("read the corpus before checking the flags")

    monkeypatch.setattr(tools.train_tokenizer, "sample_sentences", no_reading)
    argv = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "t"), flag, value]
    fails(capsys, tools.train_tokenizer.main(argv), f"error: {flag} {value} must lie in {allowed}")
    assert list(tmp_path.iterdir()) == []


def test_too_many_characters_for_the_vocabulary_says_raise_it(tmp_path, tools, capsys):
    """300 common CJK characters and 2700 that occur once (1.3% of the text) cannot all have a
    piece in a vocabulary of 600 at --character-coverage 1: the advice is to raise --vocab-size
    or lower the coverage (lowering the vocabulary, as it said before, cannot help), and lowering
    the coverage to 0.98 then trains."""
    import random

    rng = random.Random(0)
    common = ["".join(chr(0x4E00 + rng.randrange(300)) for _ in range(100)) for _ in range(2000)]
    rare = ["".join(chr(0x5000 + 30 * line + i) for i in range(30)) for line in range(90)]
    corpus = write_jsonl(tmp_path / "cjk.jsonl", [{"text": text} for text in common + rare])
    argv = ["--input", str(corpus), "--vocab-size", "600", "--output-prefix", str(tmp_path / "t")]
    assert tools.train_tokenizer.main(argv + ["--character-coverage", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --vocab-size 600 is too small for the corpus"), err
    assert "raise --vocab-size" in err[0] and "lower --character-coverage" in err[0], err[0]
    assert int(err[0].split(" need ")[1].split()[0]) > 2900  # the characters, as SentencePiece counts them
    assert tools.train_tokenizer.main(argv + ["--character-coverage", "0.98"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cjk.jsonl", "t.model", "t.vocab"]
    assert tools.train_tokenizer.main(argv + ["--character-coverage", "0.5"]) == 2
    assert "outside SentencePiece's range [0.98, 1]" in capsys.readouterr().err


def test_unwritable_output_folder_is_reported_before_training(tmp_path, tools, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some text"}])

    def no_training(*args, **kwargs):
        raise AssertionError("read the corpus before checking the output folder")

    monkeypatch.setattr(tools.train_tokenizer, "sample_sentences", no_training)
    code = tools.train_tokenizer.main(["--input", str(corpus), "--output-prefix", "/proc/tokenizer"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to output folder '/proc'" in err[0], err


def test_a_line_with_the_whitespace_mark_trains(tmp_path, tiny_records, tools, capsys):
    """U+2581 ("▁"), SentencePiece's whitespace mark, decodes as a space: a valid corpus whose
    checked line holds one (the first line, while all lines fit the sample) still trains, and the
    model maps the mark to a space as the check expects."""
    import sentencepiece

    records = [{"text": "x\u2581y foo bar \u2581lead"}] + tiny_records[:10]
    corpus = write_jsonl(tmp_path / "lowline.jsonl", records)
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output-prefix", str(tmp_path / "t")]
    assert tools.train_tokenizer.main(argv) == 0, capsys.readouterr().err
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    assert processor.decode(processor.encode("x\u2581y foo bar \u2581lead")) == "x y foo bar  lead"


def test_only_lines_over_the_sentence_limit_says_so(tmp_path, tools, capsys):
    """Lines longer than SentencePiece's sentence limit are left out; when that leaves nothing,
    the error names the limit, the first such line and the fix, not --input/--json-keys."""
    limit = tools.train_tokenizer.MAX_SENTENCE_BYTES
    long_line = " ".join(["alpha", "beta", "gamma"] * (limit // 10))
    corpus = write_jsonl(tmp_path / "long.jsonl", [{"text": ""}, {"text": long_line}, {"text": long_line}])
    code = tools.train_tokenizer.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "t")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{corpus}:2" in err[0] and f"{len(long_line)} bytes" in err[0], err[0]
    assert f"all 2 non-empty text lines are longer than {limit} bytes" in err[0], err[0]
    assert "shorter lines" in err[0] and "--json-keys" not in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]
