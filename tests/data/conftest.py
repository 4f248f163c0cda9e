"""Fixtures of the data tests: the bundled corpus, a small trained tokenizer, a preprocessed corpus.

The tools are loaded from ``tools/*.py`` and called through their ``main(argv)`` in this
process (no subprocess: importing megatron.core costs seconds).
"""

from __future__ import annotations

import importlib.util
import json
import lzma
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz"

TOKENIZER_VOCAB = 512
"""Small enough to train in about a second on 12k lines; > 256 byte pieces + 4 specials."""


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools folder is not a package)."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tools():
    """``tools.preprocess_data``, ``tools.train_tokenizer``, ``tools.merge_datasets`` modules."""

    class Tools:
        preprocess_data = load_tool("preprocess_data")
        train_tokenizer = load_tool("train_tokenizer")
        merge_datasets = load_tool("merge_datasets")

    return Tools


@pytest.fixture(scope="session")
def tiny_records() -> list[dict]:
    """All 102 documents of tiny.jsonl.xz, as dicts with ``text`` and ``source``."""
    assert TINY.is_file(), f"{TINY} is missing: it ships with the repository (git checkout it)"
    with lzma.open(TINY, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory, tiny_records, tools) -> Path:
    """A BPE tokenizer (vocab 512) trained once on the first 40 tiny documents."""
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(folder / "slice.jsonl", tiny_records[:40])
    prefix = folder / "spm"
    code = tools.train_tokenizer.main(
        [
            "--input",
            str(corpus),
            "--vocab-size",
            str(TOKENIZER_VOCAB),
            "--output-prefix",
            str(prefix),
            "--input-sentence-size",
            "12000",
            "--seed",
            "7",
        ]
    )
    assert code == 0
    return Path(f"{prefix}.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model):
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(str(tokenizer_model))


@pytest.fixture(scope="session")
def corpus_prefix(tmp_path_factory, tiny_records, tokenizer_model, tools) -> str:
    """All tiny documents preprocessed with --append-eod; returns the dataset prefix."""
    folder = tmp_path_factory.mktemp("corpus")
    corpus = write_jsonl(folder / "tiny.jsonl", tiny_records)
    code = tools.preprocess_data.main(
        [
            "--input",
            str(corpus),
            "--tokenizer-model",
            str(tokenizer_model),
            "--output-prefix",
            str(folder / "tiny"),
            "--append-eod",
        ]
    )
    assert code == 0
    return str(folder / "tiny_text_document")
