"""tools/train_tokenizer.py and its outputs: an existing tokenizer is replaced only with --force
(every .bin made with it would no longer match), a name too long is refused before training, a
corpus too small says so, and Ctrl-C leaves nothing."""

import pytest

from megatron_patch.data import staging
from tests.data.conftest import write_jsonl
from tests.data.test_bad_inputs import fails


@pytest.fixture
def corpus(tmp_path, tiny_records):
    return write_jsonl(tmp_path / "c.jsonl", tiny_records[:10])


@pytest.fixture
def no_reading(tools, monkeypatch):
    """Fail a test whose refusal comes after the corpus was read."""

    def sample(*args, **kwargs):
        raise AssertionError("read the corpus before checking the outputs")

    monkeypatch.setattr(tools.train_tokenizer, "sample_sentences", sample)


@pytest.mark.parametrize("existing", ["keep.model", "keep.vocab"])
def test_an_existing_tokenizer_is_kept_without_force(tools, corpus, tmp_path, capsys, no_reading, existing):
    (tmp_path / existing).write_bytes(b"the tokenizer of the .bin files")
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output-prefix", str(tmp_path / "keep")]
    fails(
        capsys,
        tools.train_tokenizer.main(argv),
        f"{tmp_path / existing} already exists",
        "pass --force to replace it, or choose another --output-prefix",
    )
    assert (tmp_path / existing).read_bytes() == b"the tokenizer of the .bin files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", existing]


def test_force_replaces_it_and_says_so(tools, corpus, tmp_path, capsys):
    (tmp_path / "keep.model").write_bytes(b"old")
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output-prefix", str(tmp_path / "keep"), "--force"]
    assert tools.train_tokenizer.main(argv) == 0
    replaced = [line for line in capsys.readouterr().out.splitlines() if line.startswith("replaced")]
    assert replaced == [f"replaced {tmp_path / 'keep.model'}"]
    assert (tmp_path / "keep.model").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "keep.model", "keep.vocab"]


def test_a_tokenizer_written_while_it_trained_is_kept(tools, corpus, tmp_path, capsys, monkeypatch):
    """Checked again when the outputs are moved into place: another run may have written one."""
    train = tools.train_tokenizer.train

    def train_while_another_writes(args, sentences):
        (tmp_path / "keep.model").write_bytes(b"another run's")
        return train(args, sentences)

    monkeypatch.setattr(tools.train_tokenizer, "train", train_while_another_writes)
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output-prefix", str(tmp_path / "keep")]
    fails(capsys, tools.train_tokenizer.main(argv), "keep.model was created by someone else", "--force")
    assert (tmp_path / "keep.model").read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "keep.model"]


def test_a_file_name_too_long_is_refused_before_training(tools, corpus, tmp_path, capsys, no_reading):
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / ("t" * 250))]  # 256 bytes with .model
    fails(
        capsys,
        tools.train_tokenizer.main(argv),
        "would be 256 bytes, over the 255 a file name may have",
        "shorten the file name part of --output-prefix",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_a_name_the_file_system_refuses_is_not_a_full_disk(tools, corpus, tmp_path, capsys, monkeypatch):
    """Past the early check (a file system with a shorter limit), staging's message names the
    name, not the free space."""
    monkeypatch.setattr(staging, "NAME_MAX", 4096)
    argv = ["--input", str(corpus), "--vocab-size", "400", "--output-prefix", str(tmp_path / ("t" * 250))]
    line = fails(capsys, tools.train_tokenizer.main(argv), "(256 bytes) is too long", "shorten the output name")
    assert "free space" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_a_corpus_too_small_for_any_vocabulary_says_give_more_text(tools, tmp_path, capsys):
    """SentencePiece's own maximum (under 300) is not offered as a --vocab-size the tool refuses."""
    corpus = write_jsonl(tmp_path / "one.jsonl", [{"text": "hello world"}])
    argv = ["--input", str(corpus), "--vocab-size", "5000", "--output-prefix", str(tmp_path / "t")]
    line = fails(capsys, tools.train_tokenizer.main(argv), "the corpus is too small", "give more text")
    assert "lower --vocab-size" not in line and "<=" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]


def test_ctrl_c_while_training_leaves_nothing(tools, corpus, tmp_path, capsys, monkeypatch):
    def interrupted(args, sentences):
        raise KeyboardInterrupt

    monkeypatch.setattr(tools.train_tokenizer, "train", interrupted)
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "t")]
    try:
        code = tools.train_tokenizer.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    fails(capsys, code, "error: interrupted; nothing was written", exit_code=130)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
